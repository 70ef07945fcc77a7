"""How the interfaces read what people give them, the same in the CLI, the API and the pages:
times (ISO 8601 only), pagination bounds, and the fields of a submitted HTML form.

    >>> parse_time("2024-02-16", "until", end_of_day=True)
    datetime.datetime(2024, 2, 16, 23, 59, 59, 999999)
    >>> parse_time("1710000000", "since")
    Traceback (most recent call last):
    ...
    ValueError: since '1710000000': not an ISO 8601 date or time (e.g. 2024-02-16 or 2024-02-16T08:00:00Z)
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, time
from typing import Annotated
from urllib.parse import parse_qsl, urlencode

from fastapi import Path, Query

MAX_LIMIT = 1000  # items per page
MAX_OFFSET = 10_000_000
MAX_TEXT = 500  # characters of a text parameter (ids, codes, regions, ...)
PAGES = "/views"  # the paths of the browser views

Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Text = Annotated[str | None, Query(max_length=MAX_TEXT)]  # a text parameter (an id, a code, a region)
PathId = Annotated[str, Path(max_length=MAX_TEXT)]  # a code or party id in a path: may hold '/' (route it as {name:path})
TIME_HELP = "ISO 8601 date or time, e.g. 2024-02-16 or 2024-02-16T08:00:00+08:00; no offset = UTC"


def parse_time(value: str | None, name: str, *, end_of_day: bool = False) -> datetime | None:
    """The ISO 8601 date or time given as `name`; None when not given. A date alone means
    its start, or with `end_of_day` its end (an `until` date includes the whole day). A time
    without offset is UTC (kept naive). Anything else, an empty text or a Unix timestamp
    too, is a ValueError naming `name` and the value."""
    if value is None:
        return None
    text = value.strip()
    try:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            return datetime.fromisoformat(text)
        return datetime.combine(day, time.max if end_of_day else time.min)
    except ValueError:
        raise ValueError(f"{name} {value!r}: not an ISO 8601 date or time (e.g. 2024-02-16 or 2024-02-16T08:00:00Z)") from None


class BlankFormFields:
    """ASGI middleware for the pages (paths under /views): a submitted form sends every
    field, so an empty one means 'not given' (its default), and values lose surrounding
    blanks. The API (/api) keeps its parameters as sent."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and is_page(scope["path"]) and scope.get("query_string"):
            fields = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            given = [(name, value.strip()) for name, value in fields if value.strip()]
            scope = {**scope, "query_string": urlencode(given).encode("latin-1")}
        await self.app(scope, receive, send)


def is_page(path: str) -> bool:
    """Whether `path` is a browser view (answered with HTML, errors too)."""
    return path == "/" or path == PAGES or path.startswith(PAGES + "/")
