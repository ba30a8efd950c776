"""command: run an external program per input event (a MATLAB or shell script), no Python.

    [stages.matlab_qc]
    impl = "command"

    [stages.matlab_qc.options]          # CommandOptions (docs/options.md)
    consumes = "tile_processed"
    timeout_s = 600
    command = ["matlab", "-batch", "qc('{products}', '{output}')"]
    output = "{acq}/qc/slice{slice}/{tile}.mat"

Placeholders: `{acq}`, `{slice}`, `{mosaic}`, `{row}`, `{col}`, `{tile}` (m0-r1-c2),
`{input}` (absolute path of the event's `path`, if any), `{products}` (absolute path of a
tile's products group), `{output}` (absolute path under the work root, its parent created),
`{work}`, `{raw}`, `{output_root}`. The program runs without a shell; exit code 0 is success,
anything else is retried and finally recorded as failed. Exit code and the tail of stderr are
recorded in the tile's history (`tilepipe history`).

With an `output`, a successful run is recorded beside it (`.<output name>.tilepipe-basis`: the
digest of the input's identity, its event id, which carries the digest of a recomputed
input, and of the command): the same input delivered again (a consumer reset, a
redelivery) finds its output complete with the same basis and does not run the program; a
recomputed input, another command or a `tilepipe replay --acq` runs it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from messages.events import EVENT_TYPES, Event, TileEvent
from services.core.errors import PermanentError
from services.io.atomic import atomic_file, basis_digest
from services.runtime.options import StageOptions, parse_options
from services.runtime.stage import Context, Result, Stage

STDERR_TAIL = 2000


class CommandOptions(StageOptions):
    """`[stages.NAME] options` of a command stage (`impl = "command"`)."""

    consumes: Literal[tuple(EVENT_TYPES)] = Field(  # type: ignore[valid-type]
        description="the event kind it runs on, e.g. tile_processed"
    )
    command: str | list[str] = Field(
        min_length=1, description="the program and its arguments (a list, or split like a shell)"
    )
    output: str | None = Field(
        default=None, description="its output under the work root; recorded to skip reruns"
    )
    timeout_s: float = Field(default=3600.0, gt=0, description="killed and retried after it")


class Command(Stage):
    """A stage whose handler is an external program."""

    name = "command"
    consumes = ()
    defaults: ClassVar[dict[str, Any]] = {"concurrency": 1, "ack_wait_s": 60}
    options_model = CommandOptions
    options: CommandOptions

    @classmethod
    def configured(cls, name: str, options: dict) -> type[Command]:
        """The class of one configured command stage (its input kind comes from options)."""
        kind = parse_options(CommandOptions, options, name).consumes
        return type(f"Command_{name}", (cls,), {"name": name, "consumes": (EVENT_TYPES[kind],)})

    def _values(self, event: Event) -> dict[str, str]:
        roots = self.config.roots
        values = {
            "acq": event.acq,
            "work": str(roots.work),
            "raw": str(roots.raw),
            "output_root": str(roots.output),
            "slice": event.slice_token(),
            "tile": event.tile_token(),
            "mosaic": "",
            "row": "",
            "col": "",
        }
        if isinstance(event, TileEvent):
            values.update(
                mosaic=str(event.tile.mosaic), row=str(event.tile.row), col=str(event.tile.col)
            )
        path = getattr(event, "path", None)
        if isinstance(path, str):
            root = (
                "raw"
                if event.kind == "tile_arrived"
                else ("output" if event.kind in ("slice_stitched", "slice_registered") else "work")
            )
            values["input"] = str(roots.resolve(root, path))
        products = getattr(event, "products", None)
        if products:
            first = next(iter(products.values()))
            values["products"] = str(roots.resolve("work", first.rsplit("/", 1)[0]))
        template = self.options.output
        if template:
            target = roots.resolve("work", template.format(**values))
            target.parent.mkdir(parents=True, exist_ok=True)
            values["output"] = str(target)
        return values

    def handle(self, event: Event, ctx: Context) -> Result:
        command = self.options.command
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        try:
            values = self._values(event)
            argv = [arg.format(**values) for arg in argv]
        except KeyError as exc:
            raise PermanentError(f"placeholder {exc} is not available for {event.kind}") from None
        output = values.get("output")
        marker = _marker(Path(output)) if output else None
        basis = basis_digest([event.msg_id(), command, self.options.output])
        complete = marker is not None and Path(output).exists() and _recorded(marker) == basis
        if complete and not ctx.force:
            return Result(detail="unchanged: output complete with the same basis")
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self.options.timeout_s,
                check=False,
            )
        except FileNotFoundError:
            raise PermanentError(f"program not found: {argv[0]}") from None
        stderr = proc.stderr[-STDERR_TAIL:]
        if proc.returncode != 0:
            raise RuntimeError(f"exit code {proc.returncode}; stderr: {stderr}")
        ctx.log.info("command_done", argv=argv, exit_code=0)
        if marker is not None and Path(output).exists():
            with atomic_file(marker) as tmp:
                tmp.write_text(json.dumps({"basis": basis}))
        return Result(detail=f"exit code 0; stderr: {stderr}" if stderr else "exit code 0")


def _marker(output: Path) -> Path:
    """Where a command's completion (the basis of its output) is recorded."""
    return output.with_name(f".{output.name}.tilepipe-basis")


def _recorded(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text()).get("basis")
    except (OSError, ValueError, AttributeError):
        return None
