"""Direct writes (loaders/direct_io.py): a file holds exactly the bytes written, whatever
their sizes against the block and the buffer, through appends, and without O_DIRECT."""

import errno
import os
import random

import numpy as np
import pyarrow as pa
import pytest

from loaders import direct_io
from loaders.direct_io import BLOCK, DirectFile
from tests.conftest import unavailable

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 5]


def _pieces(seed: int, buffer: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = SIZES + [rng.randrange(0, 3 * buffer) for _ in range(6)]
    rng.shuffle(sizes)
    return [rng.randbytes(n) for n in sizes]


@pytest.fixture(params=[BLOCK, 4 * BLOCK, direct_io.BUFFER], ids=lambda b: f"buffer{b}")
def buffer(request, monkeypatch):
    monkeypatch.setattr(direct_io, "BUFFER", request.param)
    return request.param


@pytest.mark.parametrize("seed", range(4))
def test_a_file_holds_the_bytes_written(tmp_path, buffer, seed):
    pieces = _pieces(seed, buffer)
    path = tmp_path / "f"
    with DirectFile(path) as f:
        for piece in pieces:
            assert f.write(piece) == len(piece)
        assert f.tell() == sum(map(len, pieces))
    assert path.read_bytes() == b"".join(pieces)


@pytest.mark.parametrize("seed", range(4))
def test_appends_continue_the_file(tmp_path, buffer, seed):
    pieces = _pieces(seed, buffer)
    path = tmp_path / "f"
    path.write_bytes(b"old")
    size = 3
    for piece in pieces:  # one opening per piece, as the spill appends
        with DirectFile(path, append=True) as f:
            f.write(piece)
        size += len(piece)
        assert os.path.getsize(path) == f.tell() == size
    assert path.read_bytes() == b"old" + b"".join(pieces)


def test_rewriting_truncates(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * BLOCK))
    with DirectFile(path) as f:
        f.write(b"short")
    assert path.read_bytes() == b"short"


def test_typed_arrays_are_written_as_their_bytes(tmp_path):
    values = np.arange(10_001, dtype=np.int64)
    with DirectFile(tmp_path / "f") as f:
        f.write(values)
        f.write(memoryview(values.astype(np.int32))[3:5])
    assert (tmp_path / "f").read_bytes() == values.tobytes() + values.astype(np.int32)[3:5].tobytes()


def test_an_arrow_ipc_file_written_through_it_reads_back(tmp_path):
    column = pa.array([f"code-{i}" if i % 7 else None for i in range(50_000)])
    schema = pa.schema([pa.field("code", column.type)])
    path = tmp_path / "0.arrow"
    with pa.PythonFile(DirectFile(path), mode="w") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([column], schema=schema))
    with pa.memory_map(str(path)) as source:
        assert pa.ipc.open_file(source).read_all().column(0).combine_chunks().equals(column)


def test_without_o_direct_the_page_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    _check_written_buffered(tmp_path / "f", seed=9)


def _check_written_buffered(path, *, seed: int) -> None:
    pieces = _pieces(seed, direct_io.BUFFER)
    with DirectFile(path) as f:
        for piece in pieces:
            f.write(piece)
    assert not f.direct
    assert path.read_bytes() == b"".join(pieces)


@pytest.fixture
def o_direct(tmp_path) -> int:
    """os.O_DIRECT, which this system and tmp_path's file system take (a real dependency:
    without it the test fails in CI and skips locally)."""
    if not hasattr(os, "O_DIRECT"):
        unavailable("no O_DIRECT on this system")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError as exc:
        unavailable(f"the file system of {tmp_path} refuses O_DIRECT: {exc}")
    return os.O_DIRECT


def test_direct_writes_are_used_where_the_file_system_takes_them(tmp_path, o_direct):
    with DirectFile(tmp_path / "f") as f:
        f.write(b"a" * (BLOCK + 1))
    assert f.direct


def test_a_file_system_refusing_direct_writes_gets_buffered_ones(tmp_path, monkeypatch, o_direct):
    """Some file systems open with O_DIRECT and then refuse the write (EINVAL): the file
    is reopened without it and nothing written is lost."""
    direct_fds: set[int] = set()
    real_open, real_pwrite = os.open, os.pwrite

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        (direct_fds.add if flags & o_direct else direct_fds.discard)(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    _check_written_buffered(tmp_path / "f", seed=5)
