"""Stage options: `[stages.NAME] options = {...}`, one pydantic model per stage.

A stage declares `options_model = MyOptions` (a `StageOptions`: unknown keys refused, typed
fields with defaults and descriptions) and reads `self.options`, parsed once when the stage is
built. `parse_options` is the one parser: a `ConfigError` naming the stage and each unknown or
invalid key, e.g. `stages.stitch.options: unknown key 'min_confidnce'`. `option_rows` lists a
model's options for the generated reference (docs/options.md, `tilepipe options`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticUndefined

from services.core.errors import ConfigError


class StageOptions(BaseModel):
    """Base of every stage's options: unknown keys are refused; a stage without options
    of its own takes none. A field is described by `Field(description=...)` or by the
    docstring below it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


Options = TypeVar("Options", bound=BaseModel)


def parse_options(model: type[Options], options: Mapping[str, Any], stage: str) -> Options:
    """`options` validated by `model`; a `ConfigError` naming the stage and each bad key."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise ConfigError(options_error(exc, stage, model)) from None


def unknown_keys(model: type[BaseModel], options: Mapping[str, Any], stage: str) -> None:
    """Refuse keys `model` does not declare, without checking the values (a disabled stage)."""
    unknown = [key for key in options if key not in model.model_fields]
    if unknown:
        raise ConfigError("\n".join(_unknown(stage, key, model) for key in unknown))


def options_error(exc: ValidationError, stage: str, model: type[BaseModel]) -> str:
    """One line per error: `stages.NAME.options: unknown key 'k' ...` or
    `stages.NAME.options.key: reason`."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(_unknown(stage, key, model))
        else:
            where = f"stages.{stage}.options" + (f".{key}" if key else "")
            lines.append(f"{where}: {err['msg']}")
    return "\n".join(lines)


def _unknown(stage: str, key: str, model: type[BaseModel]) -> str:
    close = difflib.get_close_matches(key, model.model_fields, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see `tilepipe options`"
    return f"stages.{stage}.options: unknown key {key!r} ({hint})"


def option_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of each option of `model`, in declaration order."""
    rows = []
    for name, field in model.model_fields.items():
        if field.default is not PydanticUndefined:
            default = _shown(field.default)
        elif field.default_factory is not None:
            default = _shown(field.default_factory())  # type: ignore[call-arg]
        else:
            default = "required"
        kind = " ".join([_type_name(field.annotation), *_bounds(field.metadata)])
        rows.append((name, kind, default, (field.description or "").replace("\n", " ")))
    return rows


BOUNDS = {  # a constraint's attribute -> how the reference shows it
    "gt": ">",
    "ge": ">=",
    "lt": "<",
    "le": "<=",
    "min_length": "len >=",
    "max_length": "len <=",
}


def _bounds(metadata: list[Any]) -> list[str]:
    """`>= 1`, `<= 256`, ... of a field's constraints."""
    out = []
    for item in metadata:
        for attr, sign in BOUNDS.items():
            if getattr(item, attr, None) is not None:
                out.append(f"{sign} {getattr(item, attr)}")
    return out


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        value = list(value)
    return repr(value).replace("'", '"')


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation)
    for prefix in ("typing.", "pathlib."):
        text = text.replace(prefix, "")
    text = text.replace("NoneType", "None")
    text = re.sub(r"Literal\[([^]]*)\]", lambda m: m.group(1).replace(", ", " | "), text)
    return text.replace("'", '"')
