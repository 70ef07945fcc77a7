"""Build, start, stop and inspect the local Neo4j 5.26 server (``neo4j-server/``).

The server is the small Java launcher in ``neo4j-server/`` (Neo4j Community embedded with a
Bolt connector). It listens on 127.0.0.1 only, with authentication disabled, so connect with
``bolt://127.0.0.1:PORT`` and no credentials. Everything a run writes stays under ``home``
(default ``<repo>/.neo4j``, git-ignored)::

    home/neo4j.pid   pid of the running JVM (plain text)
    home/neo4j.log   the launcher's stdout and stderr (the previous run's is neo4j.log.1)
    home/db/         Neo4j home: data/ (databases) and logs/debug.log

Settings are passed in as arguments; this module never reads the environment.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from graph.errors import ChannelgraphError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 7687
DEFAULT_HEAP = "1g"
DEFAULT_PAGECACHE = "512m"
JAR_NAME = "neo4j-launcher.jar"

# The JVM options of the Neo4j 5.26 distribution's conf/neo4j.conf (server.jvm.additional) that
# matter here; without the --add-opens Neo4j falls back to slower, noisier code paths (or fails).
JVM_FLAGS: tuple[str, ...] = (
    "-XX:+UseG1GC",
    "-XX:-OmitStackTraceInFastThrow",
    "-XX:+UnlockExperimentalVMOptions",
    "-XX:+TrustFinalNonStaticFields",
    "-XX:+DisableExplicitGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djdk.nio.maxCachedBufferSize=1024",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dlog4j2.disable.jmx=true",
    "-Dfile.encoding=UTF-8",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--enable-native-access=ALL-UNNAMED",
)

# Popen objects of servers started by this process, so their exit status is reaped (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


class Neo4jServerError(ChannelgraphError):
    """The local Neo4j server cannot be built, started, reached or stopped."""


@dataclass(frozen=True)
class ServerStatus:
    """What is known about the server of one home: ``ready`` means Bolt answered ``RETURN 1``."""

    running: bool
    pid: int | None
    uri: str
    ready: bool
    home: Path
    log_file: Path

    def describe(self) -> str:
        """One line for people."""
        if not self.running:
            return f"Neo4j is not running (home {self.home})"
        state = "ready" if self.ready else "running but not answering"
        return f"Neo4j is {state} at {self.uri} (pid {self.pid}, log {self.log_file})"


def repo_root() -> Path:
    """The repository holding this package (the folder with ``neo4j-server/``)."""
    return Path(__file__).resolve().parent.parent


def default_home(root: Path | None = None) -> Path:
    """``<repo>/.neo4j``: the default folder for the pid file, log and databases."""
    return (root or repo_root()) / ".neo4j"


def bolt_uri(port: int = DEFAULT_PORT) -> str:
    """The URI a client uses for the server on ``port`` (no credentials needed)."""
    return f"bolt://{HOST}:{port}"


def jar_path(root: Path | None = None) -> Path:
    """Where ``build`` puts the launcher jar (its dependencies are in ``lib/`` beside it)."""
    return (root or repo_root()) / "neo4j-server" / "target" / JAR_NAME


def build(root: Path | None = None, *, force: bool = False, timeout: float = 1800) -> Path:
    """Return the launcher jar, running ``mvn -q -B package -DskipTests`` first if it is missing,
    older than the pom or sources, or ``force`` is set. Raises Neo4jServerError if ``java`` or
    ``mvn`` is not on PATH or the build fails (with the end of Maven's output)."""
    project = (root or repo_root()) / "neo4j-server"
    jar = jar_path(root)
    if not (project / "pom.xml").is_file():
        raise Neo4jServerError(f"{project / 'pom.xml'} not found: is {root or repo_root()} the channelgraph repository?")
    _require_tool("java", "a Java 17+ JDK")
    if not force and _is_built(project, jar):
        return jar
    mvn = _require_tool("mvn", "Apache Maven 3.8+")
    (project / "target").mkdir(exist_ok=True)
    with _locked(project / "target" / ".build.lock"):
        if not force and _is_built(project, jar):  # another process built it while we waited
            return jar
        log.info("Building the Neo4j launcher in %s (first build downloads ~125 MB from Maven Central)", project)
        started = time.monotonic()
        try:
            done = subprocess.run([mvn, "-q", "-B", "package", "-DskipTests"], cwd=project, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise Neo4jServerError(f"Maven build of {project} took longer than {timeout:.0f} s") from exc
        if done.returncode != 0 or not jar.is_file():
            tail = _tail_text(done.stdout + done.stderr)
            raise Neo4jServerError(f"Maven build failed (exit {done.returncode}); run `mvn -B package -DskipTests` "
                                   f"in {project} to see why. Last lines:\n{tail}")
        log.info("Built %s in %.1f s", jar, time.monotonic() - started)
    return jar


def start(*, home: Path | None = None, port: int = DEFAULT_PORT, timeout: float = 120, root: Path | None = None,
          heap: str = DEFAULT_HEAP, pagecache: str = DEFAULT_PAGECACHE) -> ServerStatus:
    """Start the server of ``home`` in the background and wait until Bolt answers ``RETURN 1``.

    Builds the launcher first if needed (not counted in ``timeout``). Idempotent: if the server
    of ``home`` is already running and answers on ``port`` it is returned as is. Raises
    Neo4jServerError, with the end of the log, if the JVM exits or is not ready within
    ``timeout`` seconds (the JVM is then stopped), or if ``port`` is taken by something else.
    """
    home = (home or default_home(root)).resolve()
    home.mkdir(parents=True, exist_ok=True)
    jar = build(root)
    with _locked(home / "neo4j.lock"):
        current = status(home=home, port=port)
        if current.running:
            if current.uri != bolt_uri(port):
                raise Neo4jServerError(f"Neo4j of {home} is already running at {current.uri} (pid {current.pid}), "
                                       f"not on port {port}; stop it first")
            if current.ready or _wait_ready(current.pid, port, timeout):
                log.info("Neo4j already running at %s (pid %s)", current.uri, current.pid)
                return status(home=home, port=port)
            raise Neo4jServerError(f"Neo4j of {home} is running (pid {current.pid}) but has not answered on {current.uri} "
                                   f"for {timeout:.0f} s; stop it and look at {current.log_file}")
        if _port_open(port):
            raise Neo4jServerError(f"port {port} on {HOST} is already in use by another program; choose another --port")
        log_file = _log_file(home)
        if log_file.exists():
            log_file.replace(log_file.with_name(log_file.name + ".1"))
        java = _require_tool("java", "a Java 17+ JDK")
        cmd = [java, f"-Xms{heap}", f"-Xmx{heap}", *JVM_FLAGS, "-jar", str(jar),
               "--data", str(home / "db"), "--port", str(port), "--pagecache", pagecache]
        log.info("Starting Neo4j on %s (home %s, heap %s, page cache %s)", bolt_uri(port), home, heap, pagecache)
        log.debug("Command: %s", cmd)
        started = time.monotonic()
        with open(log_file, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        _children[proc.pid] = proc
        _pid_file(home).write_text(f"{proc.pid}\n", encoding="ascii")
        if not _wait_ready(proc.pid, port, timeout):
            died = not _alive(proc.pid)
            if not died:
                _terminate(proc.pid, grace=15)
            _pid_file(home).unlink(missing_ok=True)
            why = f"exited with status {proc.returncode}" if died else f"was not ready within {timeout:.0f} s and was stopped"
            raise Neo4jServerError(f"Neo4j {why}; see {log_file}. Last lines:\n{_tail_file(log_file)}")
        log.info("Neo4j ready at %s (pid %s) after %.1f s", bolt_uri(port), proc.pid, time.monotonic() - started)
        return status(home=home, port=port)


def stop(*, home: Path | None = None, timeout: float = 60, root: Path | None = None) -> bool:
    """Stop the server of ``home``: SIGTERM (clean shutdown), SIGKILL after ``timeout`` seconds.

    Returns True if a server was stopped, False if none was running. The pid file is removed
    either way. Raises Neo4jServerError if the process survives SIGKILL."""
    home = (home or default_home(root)).resolve()
    if not home.is_dir():
        return False
    with _locked(home / "neo4j.lock"):
        pid = _read_pid(home)
        if pid is None or _server_args(pid, home) is None:
            _pid_file(home).unlink(missing_ok=True)
            log.info("Neo4j of %s is not running", home)
            return False
        log.info("Stopping Neo4j (pid %s)", pid)
        _terminate(pid, grace=timeout)
        _pid_file(home).unlink(missing_ok=True)
        log.info("Neo4j stopped (pid %s)", pid)
        return True


def status(*, home: Path | None = None, port: int = DEFAULT_PORT, root: Path | None = None) -> ServerStatus:
    """Whether the server of ``home`` runs (its pid file names a live launcher JVM of that home)
    and whether its Bolt port answers ``RETURN 1``. The port is read from the running process's
    command line where the OS shows it, else ``port`` is assumed. Never raises for a stopped server."""
    home = (home or default_home(root)).resolve()
    pid = _read_pid(home)
    args = _server_args(pid, home) if pid is not None else None
    if args is None:
        return ServerStatus(running=False, pid=None, uri=bolt_uri(port), ready=False, home=home, log_file=_log_file(home))
    port = _arg_port(args) or port
    return ServerStatus(running=True, pid=pid, uri=bolt_uri(port), ready=_bolt_ready(port), home=home,
                        log_file=_log_file(home))


# --- helpers -----------------------------------------------------------------------------------

def _pid_file(home: Path) -> Path:
    return home / "neo4j.pid"


def _log_file(home: Path) -> Path:
    return home / "neo4j.log"


def _require_tool(name: str, what: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise Neo4jServerError(f"`{name}` not found on PATH: install {what} to build and run the local Neo4j server")
    return found


def _is_built(project: Path, jar: Path) -> bool:
    if not jar.is_file() or not any((jar.parent / "lib").glob("neo4j-kernel-*.jar")):
        return False
    built = jar.stat().st_mtime
    sources = [project / "pom.xml", *(project / "src").rglob("*.java")]
    return all(src.stat().st_mtime <= built for src in sources)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (serialises start/stop/build across processes)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_pid(home: Path) -> int | None:
    try:
        return int(_pid_file(home).read_text(encoding="ascii").strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie child is reaped and counts as dead)."""
    proc = _children.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _server_args(pid: int, home: Path) -> list[str] | None:
    """The command line of ``pid`` if it is the live launcher JVM of ``home``, else None (guards
    against a stale pid file whose pid was reused). Without /proc, trusts the pid file: ``[]``."""
    if not _alive(pid):
        return None
    try:
        args = [a.decode("utf-8", "replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return []
    is_launcher = any(a.endswith(JAR_NAME) for a in args) and str(home / "db") in args
    return args if is_launcher else None


def _arg_port(args: list[str]) -> int | None:
    """The ``--port`` value in a launcher command line, if any."""
    for flag, value in zip(args, args[1:]):
        if flag == "--port" and value.isdigit():
            return int(value)
    return None


def _terminate(pid: int, *, grace: float) -> None:
    """SIGTERM ``pid``, wait ``grace`` seconds, then SIGKILL and wait 10 s more."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
        if sig == signal.SIGTERM:
            log.warning("Neo4j (pid %s) did not stop within %.0f s of SIGTERM; sending SIGKILL", pid, grace)
    raise Neo4jServerError(f"Neo4j (pid {pid}) is still alive after SIGKILL")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _bolt_ready(port: int) -> bool:
    """True if ``RETURN 1`` over Bolt succeeds within a few seconds."""
    if not _port_open(port):
        return False
    from neo4j import GraphDatabase  # imported late: the driver is only needed once a port is open
    from neo4j.exceptions import DriverError, Neo4jError

    try:
        with GraphDatabase.driver(bolt_uri(port), auth=None, connection_timeout=3,
                                  connection_acquisition_timeout=5, max_connection_pool_size=1) as driver:
            with driver.session() as session:
                return session.run("RETURN 1 AS one").single(strict=True)["one"] == 1
    except (DriverError, Neo4jError, OSError) as exc:
        log.debug("Bolt on port %s not ready: %s", port, exc)
        return False


def _wait_ready(pid: int | None, port: int, timeout: float) -> bool:
    """Poll until Bolt answers (True), or the process dies or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            return False
        if _bolt_ready(port):
            return True
        time.sleep(0.5)
    return False


def _tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 64 * 1024))
            return _tail_text(handle.read().decode("utf-8", "replace"), lines)
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
