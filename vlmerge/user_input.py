"""Small checks shared by the readers of user input: list-valued config fields and UTF-8 text files."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlmerge.errors import VlmergeError


def string_list(value: Any, field: str, example: str, *, single: bool = True, item: type | tuple = str) -> list:
    """A list-of-strings config field as a list; None is empty.

    A lone string (a YAML scalar, or `key=value` on the command line) is one element when `single`; otherwise it is
    refused, where the user may have meant several items in one string. Never read one character at a time.
    """
    if value is None:
        return []
    if single and isinstance(value, item):
        return [value]
    is_list = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    if not is_list or not all(isinstance(v, item) for v in value):
        raise VlmergeError(f"{field} must be a list of strings, got {value!r}; write it as {example}")
    return list(value)


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file; other bytes are refused naming the file and line."""
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise VlmergeError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[error.start]:#04x}); save the file as UTF-8"
                ) from None
            yield lineno, line


def blocking_file(path: Path) -> Path | None:
    """What stops `path` from being (made) a folder: itself or its nearest existing parent when that is not a
    folder; None when the path can be a folder."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    return None if existing.is_dir() else existing
