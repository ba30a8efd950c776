"""The watcher in-process on tiny acquisitions (2 x 2 A-lines of 64 samples, random bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import os

from kernels.calibration import SpectrometerCalibration
from services.core.manifest import Calibration, Lattice, Manifest, RawLayout
from services.watcher.service import Watcher
from tests.conftest import wait_for

TINY = RawLayout(samples=64, alines=2, bscans=2)
TINY_CAL = Calibration(
    wavelength_poly_nm=SpectrometerCalibration.from_band(64).wavelength_poly_nm, autocorr_bins=4
)


def tiny_manifest(acq: str, rows: int, cols: int, settle_s: float = 0.3, slices: int = 1):
    return Manifest(
        id=acq,
        lattice=Lattice(slices=slices, rows=rows, cols=cols),
        pattern="slice{slice:03d}/tile_{index:04d}.nii",
        raw=TINY,
        settle_s=settle_s,
        calibration=TINY_CAL,
    )


def payload(manifest: Manifest) -> bytes:
    return os.urandom(manifest.raw.expected_bytes)


@contextlib.asynccontextmanager
async def watching(config, js):
    watcher = Watcher(config, js)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await wait_for(lambda: watcher.ready.is_set() or task.done())
    if task.done():
        task.result()
    try:
        yield watcher
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
