"""Small real stages used by the runtime tests (configured as plugins via `impl`)."""

from __future__ import annotations

import time
from pathlib import Path

from messages import TileArrived, TileConverted, TileCoord, TileProcessed, utcnow
from services.runtime.stage import Context, Result, Stage


def _options(ctx: Context) -> dict:
    return ctx.settings.options


def _mark(ctx: Context, name: str) -> None:
    marks = _options(ctx).get("marker_dir")
    if marks:
        Path(marks).mkdir(parents=True, exist_ok=True)
        with open(Path(marks) / name, "a") as fh:
            fh.write(f"{ctx.attempt} {time.time()}\n")


def arrived(slice_index: int, col: int, acq: str = "ops") -> TileArrived:
    """An input for ConvertLike: tile (slice, 0, col) of `acq`."""
    return TileArrived(
        acq=acq,
        tile=TileCoord(slice=slice_index, row=0, col=col),
        path=f"s{slice_index}/t{col}.nii",
        manifest="ops/manifest.toml",
        size_bytes=1,
        completed_at=utcnow(),
    )


class ConvertLike(Stage):
    """TileArrived -> TileConverted, with knobs to sleep or fail (options)."""

    name = "convert_like"
    consumes = (TileArrived,)
    produces = (TileConverted,)

    def handle(self, event: TileArrived, ctx: Context) -> Result:
        opts = _options(ctx)
        _mark(ctx, f"start-{event.tile.token()}")
        if ctx.attempt <= int(opts.get("fail_until_attempt", 0)):
            raise RuntimeError(f"injected failure on attempt {ctx.attempt}")
        time.sleep(float(opts.get("sleep_s", 0)))
        _mark(ctx, f"done-{event.tile.token()}")
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

    def handle(self, event: TileArrived, ctx: Context) -> Result:
        _mark(ctx, f"start-{event.tile.token()}")
        with open(_options(ctx)["fifo"], "rb") as fh:  # blocks until a writer comes: never
            fh.read()
        return Result()
