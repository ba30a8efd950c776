"""Small real stages used by the runtime tests (configured as plugins via `impl`)."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from messages import TileArrived, TileConverted, TileProcessed
from services.runtime.options import StageOptions
from services.runtime.stage import Context, Result, Stage


class Marked(StageOptions):
    marker_dir: str | None = Field(default=None, description="a file per attempt goes here")


class ConvertLikeOptions(Marked):
    fail_until_attempt: int = Field(default=0, description="attempts up to it fail")
    sleep_s: float = Field(default=0.0, description="each attempt sleeps this long")


class StuckOptions(Marked):
    fifo: str = Field(description="a FIFO nobody writes")


def _mark(ctx: Context, options: Marked, name: str) -> None:
    marks = options.marker_dir
    if marks:
        Path(marks).mkdir(parents=True, exist_ok=True)
        with open(Path(marks) / name, "a") as fh:
            fh.write(f"{ctx.attempt} {time.time()}\n")


class ConvertLike(Stage):
    """TileArrived -> TileConverted, with knobs to sleep or fail (options)."""

    name = "convert_like"
    consumes = (TileArrived,)
    produces = (TileConverted,)
    options_model = ConvertLikeOptions

    def handle(self, event: TileArrived, ctx: Context) -> Result:
        _mark(ctx, self.options, f"start-{event.tile.token()}")
        if ctx.attempt <= self.options.fail_until_attempt:
            raise RuntimeError(f"injected failure on attempt {ctx.attempt}")
        time.sleep(self.options.sleep_s)
        _mark(ctx, self.options, f"done-{event.tile.token()}")
        return Result(
            events=[
                TileConverted(
                    acq=event.acq,
                    tile=event.tile,
                    path=f"conv/{event.tile.token()}.zarr",
                    raw_path=event.path,
                    shape=[1, 2, 3],
                    dtype="uint16",
                    producer=self.name,
                )
            ],
            bytes_read=event.size_bytes,
        )


class ProcessLike(Stage):
    """TileConverted -> TileProcessed (async handler)."""

    name = "process_like"
    consumes = (TileConverted,)
    produces = (TileProcessed,)

    async def handle(self, event: TileConverted, ctx: Context) -> Result:
        return Result(
            events=[
                TileProcessed(
                    acq=event.acq,
                    tile=event.tile,
                    products={"aip": f"p/{event.tile.token()}"},
                    device="cpu",
                    seconds=0.0,
                    producer=self.name,
                )
            ]
        )


class StuckReader(Stage):
    """TileArrived -> nothing: reads `options.fifo`, a FIFO nobody writes (a read that never
    returns, as on a hung network mount)."""

    name = "stuck"
    consumes = (TileArrived,)
    options_model = StuckOptions

    def handle(self, event: TileArrived, ctx: Context) -> Result:
        _mark(ctx, self.options, f"start-{event.tile.token()}")
        with open(self.options.fifo, "rb") as fh:  # blocks until a writer comes: never
            fh.read()
        return Result()
