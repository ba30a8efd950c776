"""Paths carried by events: relative to a configured data root, never absolute, never escaping."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated

from pydantic import AfterValidator

MAX_PATH_CHARS = 1024


class PathEscapeError(ValueError):
    """A relative path that would leave its data root."""


def check_relative(value: str) -> str:
    """Validate a root-relative POSIX path: not empty, not absolute, no `..`, no NUL."""
    if not value or len(value) > MAX_PATH_CHARS:
        raise ValueError(f"path must be 1..{MAX_PATH_CHARS} characters")
    if "\x00" in value or "\\" in value:
        raise ValueError("path contains NUL or backslash")
    if value.startswith(("/", "~")):
        raise ValueError("path must be relative to a data root, not absolute")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError("path must not contain '..'")
    if "" in parts or "." in parts:  # normalise a//b, a/./b, trailing slash
        return PurePosixPath(value).as_posix()
    return value


RelPath = Annotated[str, AfterValidator(check_relative)]


def resolve_in_root(root: Path, rel: str) -> Path:
    """Join `rel` onto `root`, following symlinks; refuse anything that lands outside `root`."""
    check_relative(rel)
    base = Path(root).resolve()
    try:
        target = (base / rel).resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise PathEscapeError(f"{rel!r} cannot be resolved: {exc}") from None
    if target != base and base not in target.parents:
        raise PathEscapeError(f"{rel!r} resolves outside its root {base}")
    return target


def relative_to_root(root: Path, path: Path) -> str:
    """The root-relative POSIX form of `path`, which must lie inside `root`."""
    base = Path(root).resolve()
    full = Path(path).resolve()
    try:
        return full.relative_to(base).as_posix()
    except ValueError as exc:
        raise PathEscapeError(f"{path} is not inside {base}") from exc
