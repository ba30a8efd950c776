"""`tilepipe options`: every stage's options (name, type, default, description), generated from
the stages' option models; docs/options.md is its output (tests/test_options.py compares)."""

from __future__ import annotations

import argparse
import inspect

from services.runtime.options import StageOptions, option_rows
from services.stages import BUILTIN, options_model, stage_names

# stages shipped with tilepipe but configured by `impl` (not run unless configured)
SHIPPED = {"notify": "services.stages.notify:Notify", "command": "command"}

HEADER = """# Stage options

Generated from the stages' option models (`options_model` of each stage, a pydantic
`StageOptions`) by `tilepipe options > docs/options.md`; `tests/test_options.py` fails when
this page and the models disagree. Set them as `[stages.NAME] options = {...}` in the config
(or `TILEPIPE_STAGES__NAME__OPTIONS__KEY`). `tilepipe check`, `tilepipe run`, `tilepipe up`
and every other command that reads the config refuse an unknown key or a wrong value at
start, naming it (e.g. `stages.stitch.options: unknown key 'min_confidnce' (did you mean
'min_confidence'?)`); a disabled stage's keys are checked, its values only when it runs.
"""


def options_markdown() -> str:
    """The reference page of every stage's options."""
    parts = [HEADER.strip()]
    stages = {**{name: BUILTIN[name] for name in stage_names()}, **SHIPPED}
    for name, impl in stages.items():
        model = options_model(name, impl)
        where = f'`impl = "{impl}"`' if name in SHIPPED else "built in"
        parts.append(f"## {name}\n\n{where}; `{model.__module__}.{model.__name__}`.")
        doc = vars(model).get("__doc__")  # its own, not its base's
        if doc and model is not StageOptions:
            parts.append(" ".join(inspect.cleandoc(doc).split("\n\n")[0].split()))
        rows = option_rows(model)
        if not rows:
            parts.append("No options.")
            continue
        lines = ["| option | type | default | description |", "|---|---|---|---|"]
        for key, kind, default, description in rows:
            shown = default if default == "required" else f"`{default}`"
            cells = [f"`{key}`", f"`{kind}`", shown, description]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def options_command(args: argparse.Namespace) -> int:
    print(options_markdown(), end="")
    return 0
