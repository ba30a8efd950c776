"""TOML files: writing them (the standard library only reads them), and one way to report a
file that does not read."""

from __future__ import annotations

import contextlib
import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def toml_read_errors(
    path: Path, what: str, error: type[Exception], invalid: type[Exception] | None = None
) -> Iterator[None]:
    """Report a failure to read the TOML file `path` as `error` naming the file: missing
    (`<what> not found`), unreadable, or not TOML (as `invalid`, default `error`)."""
    try:
        yield
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise (invalid or error)(f"{path}: not valid TOML: {str(exc)[:200]}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None


def to_toml(data: dict[str, Any]) -> str:
    """TOML text of nested dicts of scalars and lists (None values are left out); a list of
    dicts becomes an array of tables (``[[key]]``)."""
    out: list[str] = []

    def is_tables(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    def scalars_of(table: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v
            for k, v in table.items()
            if not isinstance(v, dict) and not is_tables(v) and v is not None
        }

    def emit(prefix: str, table: dict[str, Any], header: str | None = None) -> None:
        scalars = scalars_of(table)
        if header is not None:
            out.append(header)
        elif prefix and scalars:
            out.append(f"[{prefix}]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        if scalars or header is not None:
            out.append("")
        for key, value in table.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                emit(name, value)
            elif is_tables(value):
                for item in value:
                    emit(name, item, header=f"[[{name}]]")

    emit("", data)
    return "\n".join(out)
