"""Writing TOML (the standard library only reads it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def to_toml(data: dict[str, Any]) -> str:
    """TOML text of nested dicts of scalars and lists (None values are left out)."""
    out: list[str] = []

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        if prefix and scalars:
            out.append(f"[{prefix}]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        if scalars:
            out.append("")
        for key, value in table.items():
            if isinstance(value, dict):
                emit(f"{prefix}.{key}" if prefix else key, value)

    emit("", data)
    return "\n".join(out)


def write_atomically(path: Path, text: str) -> Path:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
