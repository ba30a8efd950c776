"""register: align each slice's mosaic to the previous slice and grow the registered volume;
register each slice's tilted mosaic onto its normal one and fit the 3-D optic axis.

Consumes `slice_stitched`. Thru-plane (every mosaic; :mod:`services.stages.thruplane`): when
a slice's normal mosaic (`options.mosaic`) and a tilted one are both stitched, the tilted one
is registered onto the normal one, the optic axis fitted per pixel, the products written to
`<acq>/axis/sliceNNNN.ome.zarr` and `slice_axis` published; registered slices' axis products
are stacked into `<acq>/volume/axis.ome.zarr`. Slice to slice (only mosaic `options.mosaic`,
default 0): slice k is registered
once slice k - 1 is registered: its en-face mosaic (`options.channel`, AIP by default) is
aligned to slice k - 1's (:func:`kernels.register.register_slices`: Fourier-Mellin / phase
correlation, then Gauss-Newton), starting from the stage prior given by the mosaics' origins.
The pair transform is composed with slice k - 1's transform to slice 0, every en-face product
is resampled into slice 0's frame and written as plane z = k of the volume
(:mod:`services.io.volume`, path :func:`services.io.layout.volume_path`), and `slice_registered`
is published. Slices that arrive before their predecessor wait (state in KV bucket
`tp-lattice`, keys `<acq>.register.m<mosaic>.<slice>.stitched|registered`); when the
predecessor is registered the waiting successors are registered in the same delivery.

Transforms (`slice_registered.transform`, 3x3, homogeneous `(y, x, 1)`): slice k's mosaic
pixel -> slice 0's mosaic pixel (level 0; conventions of :mod:`kernels.register`). Volume
canvas pixel = slice 0 mosaic pixel + `Canvas.offset_yx` (a margin, `options.margin_px`).

A failed or low-quality registration is flagged (`accepted = False`, metric
`tilepipe_register_slices_total{outcome="rejected"}`) and replaced per `options.fallback`:
`"previous"` (default: same placement as slice k - 1, i.e. the stage prior between the two
mosaics) or `"identity"` (the stage prior to slice 0). Everything is deterministic: redoing a
slice with the same inputs gives the same transform and rewrites the same plane. A replay or
retry (`tilepipe replay`) recomputes the slice it delivers; otherwise a slice is recomputed
when its inputs, its predecessor's result or the options changed (or its plane is missing),
and its successors after it; unchanged successors are announced again, not recomputed.

Options (`[stages.register] options = {...}`): `RegisterOptions`, listed in docs/options.md.
Run it with concurrency 1 and one worker (the KV bookkeeping is read-modify-write).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import zarr
from prometheus_client import Counter, Histogram
from pydantic import Field

from kernels.register import (
    MODELS,
    Pyramid,
    RegisterParams,
    register_slices,
    translation_matrix,
    warp_stack,
)
from kernels.thruplane import UNITS as AXIS_UNITS
from messages.events import Event, SliceAxis, SliceRegistered, SliceStitched
from services.core.errors import PermanentError
from services.io.atomic import COMPLETE_ATTR, zarr_attrs
from services.io.exports import export_axis
from services.io.layout import axis_path, axis_volume_path, volume_of, volume_path
from services.io.omezarr import open_level, read_multiscale
from services.io.volume import Canvas, Volume
from services.runtime.stage import Context, Result, Stage
from services.stages.thruplane import (
    AXIS_VOLUME_CHANNELS,
    AxisBook,
    AxisOptionFields,
    axis_canvas,
    axis_event,
    compute_axis,
    digest,
    is_done,
    pick_tilted,
    warp_axis,
)
from services.state.acquisitions import ACQ_BUCKET, manifest_at
from services.state.buckets import Buckets, KeyValue
from services.state.lattice import LATTICE_BUCKET, SliceBook

REGISTER_SLICES = Counter(
    "tilepipe_register_slices_total",
    "Slices registered, by outcome (reference, accepted, rejected: fallback transform used).",
    ["outcome"],
)
REGISTER_QUALITY = Histogram(
    "tilepipe_register_quality",
    "Quality (weighted NCC) of slice-to-slice registrations.",
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
REGISTER_WAITING = Counter(
    "tilepipe_register_waiting_total",
    "Stitched slices that had to wait for their predecessor (out-of-order arrival).",
)

FALLBACKS = ("previous", "identity")
DEFAULT_THICKNESS_UM = 200.0


@dataclass(frozen=True)
class Mosaic:
    """One slice's mosaic store: channels, pixel size and origin (level-0 pixels), and its
    `tilepipe` attributes (illumination, tilt, mask, conventions)."""

    path: Path
    channels: list[str]
    pixel_size_um: tuple[float, float]
    origin_px: tuple[float, float]
    shape: tuple[int, int]
    attrs: dict = field(default_factory=dict, compare=False)

    @staticmethod
    def open(path: Path) -> Mosaic:
        meta = read_multiscale(path)
        scale, translation = meta["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        py, px = float(scale["scale"][-2]), float(scale["scale"][-1])
        oy, ox = float(translation["translation"][-2]), float(translation["translation"][-1])
        shape = open_level(path, 0).shape
        attrs = dict(zarr_attrs(path).get("tilepipe", {}))
        return Mosaic(
            path, list(meta["channel_names"]), (py, px), (oy / py, ox / px), shape[1:], attrs
        )

    def read(self, name: str) -> np.ndarray:
        """Level 0 of one channel (float32)."""
        return np.asarray(open_level(self.path, 0)[self.channels.index(name)], dtype=np.float32)

    def pyramid(self, name: str, read: list[int]) -> Pyramid:
        """Channel `name` (else the first) as a pyramid whose levels are read from the
        store's own levels (so registration never reads level 0 of a large mosaic); bytes
        read are appended to `read`."""
        idx = self.channels.index(name) if name in self.channels else 0
        datasets = read_multiscale(self.path)["multiscales"][0]["datasets"]
        by_factor = {}
        for k, ds in enumerate(datasets):
            f = ds["coordinateTransformations"][0]["scale"][-1] / self.pixel_size_um[1]
            by_factor[round(f)] = k

        def load(f: int) -> np.ndarray | None:
            if f not in by_factor:
                return None
            arr = np.asarray(open_level(self.path, by_factor[f])[idx], dtype=np.float32)
            read.append(arr.nbytes)
            return arr

        return Pyramid(self.shape, loader=load)

    def stack(self) -> np.ndarray:
        return np.asarray(open_level(self.path, 0)[:], dtype=np.float32)

    def prior(self, other: Mosaic) -> np.ndarray:
        """Stage prior: this mosaic's pixel -> `other`'s pixel with no sample motion."""
        return translation_matrix(
            self.origin_px[0] - other.origin_px[0], self.origin_px[1] - other.origin_px[1]
        )


class RegisterBook(SliceBook):
    """Registration state of one acquisition's mosaic index in KV `tp-lattice`
    (`<slice>.stitched|registered`)."""

    def __init__(self, kv: KeyValue, acq: str, mosaic: int) -> None:
        super().__init__(kv, f"{acq}.register.m{mosaic}")

    @staticmethod
    async def open(buckets: Buckets, acq: str, mosaic: int) -> RegisterBook:
        return RegisterBook(await buckets.kv(LATTICE_BUCKET), acq, mosaic)


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _matrix(value: list[list[float]]) -> np.ndarray:
    return np.asarray(value, dtype=float)


def _listed(m: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(m, dtype=float)]


_PARAMS = RegisterParams()


class RegisterOptions(AxisOptionFields):
    """`[stages.register] options`: slice to slice, then the thru-plane step's `axis*`."""

    mosaic: int = Field(default=0, description="the mosaic registered slice to slice")
    channel: str = Field(default="aip", description="en-face channel registered")
    fallback: Literal[FALLBACKS] = Field(  # type: ignore[valid-type]
        default="previous",
        description="placement of a rejected slice: previous (slice k - 1's) or identity",
    )
    margin_px: int | None = Field(
        default=None, description="volume margin; none: max(64, 5% of slice 0's larger side)"
    )
    first_slice: int = Field(default=0, description="slices before it are ignored")
    slice_thickness_um: float | None = Field(
        default=None, description="none: the manifest's, else 200"
    )
    threads: int = Field(default=1, description="resampling threads")
    db_volume: bool = Field(
        default=False, description="also resample stitch's fused dB volume, when there is one"
    )
    db_depth: int | None = Field(
        default=None, description="dB planes per slice; none: slice thickness / axial pixel"
    )
    db_block: int = Field(default=16, description="dB planes resampled at a time")
    model: Literal[MODELS] = Field(  # type: ignore[valid-type]
        default=_PARAMS.model, description="rigid, similarity (+ scale) or affine"
    )
    max_rotation_deg: float = Field(
        default=_PARAMS.max_rotation_deg, description="search range; > 90 also tries a flip"
    )
    max_scale_change: float = Field(
        default=_PARAMS.max_scale_change, description="similarity/affine: |s - 1| accepted"
    )
    max_shift_px: float | None = Field(
        default=_PARAMS.max_shift_px, description="accepted distance from the stage prior"
    )
    coarse_size: int = Field(
        default=_PARAMS.coarse_size, description="max side of the global-search image"
    )
    refine_size: int = Field(
        default=_PARAMS.refine_size, description="max side of the finest refinement level"
    )
    sigma_low: float = Field(default=_PARAMS.sigma_low, description="band-pass low sigma")
    sigma_high: float = Field(default=_PARAMS.sigma_high, description="band-pass high sigma")
    max_points: int = Field(
        default=_PARAMS.max_points, description="pixels per Gauss-Newton iteration"
    )
    max_iter: int = Field(default=_PARAMS.max_iter, description="Gauss-Newton iterations")
    min_quality: float = Field(
        default=_PARAMS.min_quality, description="weighted NCC below it: rejected"
    )
    min_overlap: float = Field(
        default=_PARAMS.min_overlap, description="overlap / smaller valid area below it: rejected"
    )

    def params(self) -> RegisterParams:
        """The slice-to-slice registration settings."""
        return RegisterParams(
            **{name: getattr(self, name) for name in RegisterParams.__dataclass_fields__}
        )


class Register(Stage):
    """Slice-to-slice registration and the growing registered volume."""

    name = "register"
    consumes = (SliceStitched,)
    produces = (SliceRegistered, SliceAxis)
    buckets = (LATTICE_BUCKET, ACQ_BUCKET)
    defaults: ClassVar[dict[str, Any]] = {
        "concurrency": 1,
        "ack_wait_s": 600,
        "drain_timeout_s": 600,
    }

    options_model = RegisterOptions
    options: RegisterOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        o = self.options
        self.mosaic = o.mosaic
        self.channel = o.channel
        self.fallback = o.fallback
        self.margin_px = o.margin_px
        self.first_slice = o.first_slice
        self.thickness_um = o.slice_thickness_um
        self.threads = o.threads
        self.db_volume = o.db_volume
        self.db_depth = o.db_depth
        self.db_block = o.db_block
        self.axis = o.axis_options()
        self.params = o.params()
        self._thickness: dict[str, float] = {}

    # ------------------------------------------------------------------ event flow
    async def handle(self, event: Event, ctx: Context) -> Result:
        assert isinstance(event, SliceStitched)
        if event.slice < self.first_slice:
            return Result()
        redo = bool(getattr(ctx, "force", getattr(ctx, "replay", None)))
        result = Result()
        if event.mosaic == self.mosaic:
            result = await self._slice_to_slice(event, ctx, redo)
        if self.axis.enabled:
            axis = await self._thruplane(event, ctx, redo)
            result.events.extend(axis.events)
            result.bytes_read += axis.bytes_read
            result.bytes_written += axis.bytes_written
            await self._stack_axes(event.acq, ctx)
        return result

    async def _slice_to_slice(self, event: SliceStitched, ctx: Context, redo: bool) -> Result:
        """Register slice k to k - 1 (and any waiting successors), grow the volume."""
        book = await RegisterBook.open(ctx, event.acq, self.mosaic)
        await book.put(event.slice, "stitched", {"path": event.path, "inputs": event.inputs})
        state = await book.state()
        k = event.slice
        if k > self.first_slice and "registered" not in state.get(k - 1, {}):
            REGISTER_WAITING.inc()
            ctx.log.info("register_waiting", slice=k, waiting_for=k - 1)
            return Result()
        thickness = await self._slice_thickness(ctx, event.acq)
        result = Result()
        # a replay or retry recomputes the slice it was given; otherwise a slice (and each
        # waiting successor) is computed unless the same work is recorded and in the volume
        j = k
        while "stitched" in state.get(j, {}):
            basis = self._basis(state, j)
            done = state[j].get("registered")
            if redo or not self._done(event.acq, j, done, basis):
                done = await asyncio.to_thread(
                    self._register, event.acq, j, state, basis, thickness, ctx.log
                )
                result.bytes_read += done.pop("_bytes_read", 0)
                result.bytes_written += done.pop("_bytes_written", 0)
                await book.put(j, "registered", done)
                state[j]["registered"] = done
            result.events.append(self._event(event.acq, j, done))
            redo = False
            j += 1
        return result

    # ------------------------------------------------------------------ thru-plane
    async def _thruplane(self, event: SliceStitched, ctx: Context, redo: bool) -> Result:
        """Record the stitched mosaic; when the slice has its normal and tilted mosaics, fit
        the 3-D optic axis (or find it done) and announce it (services/stages/thruplane.py)."""
        mosaic = self._mosaic(event.path)  # its attributes say illumination and tilt
        book = await AxisBook.open(ctx, event.acq)
        j = event.slice
        await book.put(
            j,
            f"m{event.mosaic}",
            {
                "path": event.path,
                "inputs": event.inputs,
                "illumination": mosaic.attrs.get("illumination", ""),
                "tilt_deg": float(mosaic.attrs.get("tilt_deg") or 0.0),
            },
        )
        records = (await book.state()).get(j, {})
        normal = records.get(f"m{self.mosaic}")
        t = pick_tilted(records, self.mosaic, self.axis.tilted_mosaic)
        if normal is None or t is None:
            return Result()  # the slice's other mosaic is not stitched yet
        tilted = records[f"m{t}"]
        options = dataclasses.asdict(self.axis)
        basis = digest([normal, tilted, t, options])
        rel = axis_path(event.acq, j)
        output = self.config.roots.resolve("output", rel)
        done = records.get("done")
        result = Result()
        computed = redo or not is_done(output, done, basis)
        if computed:
            inputs = {f"m{self.mosaic}": normal, f"m{t}": tilted}
            done = await asyncio.to_thread(
                compute_axis,
                event.acq,
                j,
                self._mosaic(normal["path"]),
                self._mosaic(tilted["path"]),
                t,
                self.axis,
                basis,
                inputs,
                output,
                rel,
                self.threads,
            )
            await book.put(j, "done", done)
            fig = done["figures"]
            log = ctx.log.info if done["accepted"] else ctx.log.warning
            log(
                "slice_axis",
                slice=j,
                tilted_mosaic=t,
                accepted=done["accepted"],
                reason=done["reason"],
                quality=round(done["quality"], 3),
                fitted_fraction=round(fig.get("fitted_fraction") or 0.0, 3),
                residual_median=fig.get("residual_median"),
                register_s=round(fig.get("register_s", 0.0), 3),
                fit_s=round(fig.get("fit_s", 0.0), 3),
                total_s=round(fig.get("total_s", 0.0), 3),
            )
        exports = await asyncio.to_thread(
            export_axis,
            self.config.roots.output,
            rel,
            j,
            await self._slice_thickness(ctx, event.acq),
            force=computed,
        )
        result.events.append(axis_event(event.acq, j, self.mosaic, done, self.name, exports))
        return result

    async def _stack_axes(self, acq: str, ctx: Context) -> None:
        """Write the axis products of every registered slice whose plane in the axis volume
        is missing or from other inputs (slice registered and axis fitted, in either order)."""
        axis_state = await (await AxisBook.open(ctx, acq)).state()
        if not any("done" in recs for recs in axis_state.values()):
            return
        reg_state = await (await RegisterBook.open(ctx, acq, self.mosaic)).state()
        ready = {
            j: (reg_state[j]["registered"], axis_state[j]["done"])
            for j in axis_state
            if "done" in axis_state[j] and "registered" in reg_state.get(j, {})
        }
        first = reg_state.get(self.first_slice, {}).get("stitched")
        if not ready or first is None:
            return
        thickness = await self._slice_thickness(ctx, acq)
        await asyncio.to_thread(self._write_axis_planes, acq, ready, first, thickness, ctx.log)

    def _write_axis_planes(
        self, acq: str, ready: dict, first: dict, thickness_um: float, log: Any
    ) -> None:
        path = self.config.roots.resolve("output", axis_volume_path(acq))
        canvas = axis_canvas(self._canvas(self._mosaic(first["path"]), thickness_um))
        volume = None
        for j, (registered, axis) in sorted(ready.items()):
            basis = digest([registered["basis"], registered["to_canvas"], axis["basis"]])
            z = j - self.first_slice
            if volume is None:
                volume = Volume.open_or_create(
                    path,
                    canvas,
                    attributes={
                        "acq": acq,
                        "mosaic": self.mosaic,
                        "first_slice": self.first_slice,
                        "units": {c: AXIS_UNITS[c] for c in AXIS_VOLUME_CHANNELS},
                        "resampling": "azimuth as doubled angles, inclination as the vector "
                        "(alpha cos theta, alpha sin theta), axis recomputed from both; levels "
                        "> 0 are 2x2 means of each channel",
                    },
                )
            if volume.planes().get(z, {}).get("basis") == basis:
                continue
            store = self._mosaic(axis["path"])
            products = {name: store.read(name) for name in store.channels}
            to_canvas = np.asarray(registered["to_canvas"], dtype=float)
            plane = warp_axis(products, to_canvas, canvas.shape, self.threads)
            volume.write_plane(
                z,
                plane,
                {
                    "slice": j,
                    "basis": basis,
                    "path": axis["path"],
                    "to_canvas": registered["to_canvas"],
                    "axis_basis": axis["basis"],
                    "accepted": axis["accepted"],
                },
            )
            log.info("axis_stacked", slice=j, volume=axis_volume_path(acq))

    def _done(self, acq: str, j: int, done: dict | None, basis: str) -> bool:
        """Whether slice j was registered from this basis and its plane is in the volume."""
        if done is None or done.get("basis") != basis:
            return False
        path = self.config.roots.resolve("output", volume_path(acq))
        try:
            plane = Volume(path).planes().get(j - self.first_slice, {})
        except (FileNotFoundError, KeyError, ValueError):
            return False
        return plane.get("basis") == basis

    def _basis(self, state: dict[int, dict[str, dict]], j: int) -> str:
        """Identity of everything slice j's registration depends on."""
        own = state[j]["stitched"]
        prev = None
        if j > self.first_slice:
            p = state[j - 1]
            prev = [p["stitched"], p["registered"]["transform"], p["registered"]["basis"]]
        options = [self.channel, self.fallback, self.margin_px, self.db_volume, self.db_depth]
        return _digest([own, prev, options, self.params.__dict__])

    def _event(self, acq: str, j: int, rec: dict) -> SliceRegistered:
        return SliceRegistered(
            acq=acq,
            slice=j,
            mosaic=self.mosaic,
            path=rec["path"],
            transform=rec["transform"],
            quality=rec["quality"],
            accepted=rec["accepted"],
            basis=rec.get("basis", ""),
            producer=self.name,
        )

    async def _slice_thickness(self, ctx: Context, acq: str) -> float:
        """Option, else the manifest's (when the raw root is readable here), else 200 um."""
        if self.thickness_um is not None:
            return float(self.thickness_um)
        if acq not in self._thickness:
            value = DEFAULT_THICKNESS_UM
            try:
                record = await ctx.acquisition(acq)
                if record is not None:
                    manifest = manifest_at(self.config.roots.raw, record["manifest"])
                    value = float(manifest.lattice.slice_thickness_um)
            except Exception as exc:  # the raw root need not be mounted on this host
                ctx.log.info("slice_thickness_default", um=value, reason=str(exc)[:200])
            self._thickness[acq] = value
        return self._thickness[acq]

    # ------------------------------------------------------------------ numerics + volume
    def _register(
        self,
        acq: str,
        j: int,
        state: dict[int, dict[str, dict]],
        basis: str,
        thickness_um: float,
        log: Any,
    ) -> dict:
        """Register slice j to j - 1 (or make it the reference) and write its plane."""
        started = time.perf_counter()
        roots = self.config.roots
        moving = self._mosaic(state[j]["stitched"]["path"])
        read = 0
        rec: dict[str, Any] = {"basis": basis, "inputs": state[j]["stitched"]}
        if j == self.first_slice:
            pair = np.eye(3)
            composed = np.eye(3)
            rec.update(quality=1.0, accepted=True, reason="reference slice", fallback=False)
            REGISTER_SLICES.labels("reference").inc()
            reference = moving
        else:
            fixed = self._mosaic(state[j - 1]["stitched"]["path"])
            reference = self._mosaic(state[self.first_slice]["stitched"]["path"])
            if fixed.pixel_size_um != moving.pixel_size_um:
                raise PermanentError(
                    f"slice {j} pixel size {moving.pixel_size_um} differs from slice {j - 1}'s"
                )
            prior = moving.prior(fixed)
            nbytes: list[int] = []
            a, b = fixed.pyramid(self.channel, nbytes), moving.pyramid(self.channel, nbytes)
            reg = register_slices(a, b, init=prior, params=self.params)
            read += sum(nbytes)
            previous = _matrix(state[j - 1]["registered"]["transform"])
            if reg.accepted:
                pair = reg.matrix
                composed = previous @ pair
            elif self.fallback == "previous":
                pair = prior
                composed = previous @ pair
            else:
                composed = moving.prior(reference)
                pair = np.linalg.inv(previous) @ composed
            outcome = "accepted" if reg.accepted else "rejected"
            REGISTER_SLICES.labels(outcome).inc()
            REGISTER_QUALITY.observe(max(0.0, reg.quality))
            rec.update(
                quality=float(reg.quality),
                accepted=bool(reg.accepted),
                reason=reg.reason,
                fallback=not reg.accepted,
                estimate=_listed(reg.matrix),
                rotation_deg=float(reg.rotation_deg),
                overlap=float(reg.overlap),
                iterations=int(reg.iterations),
            )
            if not reg.accepted:
                log.warning(
                    "registration_rejected",
                    slice=j,
                    reason=reg.reason,
                    quality=round(reg.quality, 3),
                    fallback=self.fallback,
                )
        register_s = time.perf_counter() - started

        rel = volume_path(acq)
        canvas = self._canvas(reference, thickness_um)
        volume = Volume.open_or_create(
            roots.resolve("output", rel),
            canvas,
            attributes={"acq": acq, "mosaic": self.mosaic, "first_slice": self.first_slice},
        )
        stack = moving.stack()
        read += stack.nbytes
        to_canvas = canvas.from_reference() @ composed
        axial = [n in canvas.axial for n in moving.channels]
        warped = warp_stack(stack, to_canvas, canvas.shape, axial, threads=self.threads)
        if list(canvas.channels) == moving.channels:
            plane = warped
        else:
            plane = np.full((len(canvas.channels), *canvas.shape), np.nan, dtype=np.float32)
            for c, name in enumerate(canvas.channels):
                if name in moving.channels:
                    plane[c] = warped[moving.channels.index(name)]
        inside = int(np.isfinite(plane[0]).sum())
        valid = int(np.isfinite(stack[0]).sum())
        cropped = max(0.0, 1.0 - inside / valid) if valid else 0.0
        rec.update(
            path=rel,
            pair=_listed(pair),
            transform=_listed(composed),
            to_canvas=_listed(to_canvas),
            cropped=round(cropped, 6),
        )
        if cropped > 0.01:
            log.warning("volume_cropped", slice=j, fraction=round(cropped, 4))
        z = j - self.first_slice
        if self.db_volume:  # first, so that the plane's record says what became of it
            rec["db"] = self._write_db(
                j, z, state[j]["stitched"]["path"], moving, to_canvas, volume, thickness_um, log
            )
        written = volume.write_plane(z, plane, {**rec, "slice": j})
        log.info(
            "slice_registered",
            slice=j,
            accepted=rec["accepted"],
            quality=round(rec["quality"], 3),
            register_s=round(register_s, 3),
            total_s=round(time.perf_counter() - started, 3),
        )
        rec["_bytes_read"] = read
        rec["_bytes_written"] = written
        return rec

    def _mosaic(self, rel: str) -> Mosaic:
        path = self.config.roots.resolve("output", rel)
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(f"mosaic {rel} not found under the output root")
        return Mosaic.open(path)

    def _canvas(self, reference: Mosaic, thickness_um: float) -> Canvas:
        ny, nx = reference.shape
        margin = self.margin_px
        if margin is None:
            margin = max(64, math.ceil(0.05 * max(ny, nx)))
        margin = int(margin)
        py, px = reference.pixel_size_um
        oy, ox = reference.origin_px
        return Canvas(
            shape=(ny + 2 * margin, nx + 2 * margin),
            offset_yx=(float(margin), float(margin)),
            pixel_size_um=(py, px),
            origin_um=((oy - margin) * py, (ox - margin) * px),
            slice_thickness_um=float(thickness_um),
            channels=tuple(reference.channels),
        )

    # ------------------------------------------------------------------ dB volume
    def _write_db(
        self,
        j: int,
        z: int,
        stitched_rel: str,
        mosaic: Mosaic,
        to_canvas: np.ndarray,
        volume: Volume,
        thickness_um: float,
        log: Any,
    ) -> str:
        """Resample slice j's fused dB volume (written by stitch with `fuse_volume = true`
        beside the mosaic) like the en-face planes and write its top `db_depth` planes.
        Returns "written (<n> planes)" or "skipped: <reason>" (logged)."""
        path = self.config.roots.resolve("output", volume_of(stitched_rel))
        if not zarr_attrs(path).get(COMPLETE_ATTR):
            reason = f"no fused dB volume at {volume_of(stitched_rel)} (stitch fuse_volume off?)"
            log.warning("db_volume_skipped", slice=j, reason=reason)
            return f"skipped: {reason}"
        group = zarr.open_group(str(path), mode="r")
        scale, translation = group.attrs["ome"]["multiscales"][0]["datasets"][0][
            "coordinateTransformations"
        ]
        axial_um, py, px = (float(v) for v in scale["scale"])
        origin = (translation["translation"][1] / py, translation["translation"][2] / px)
        arr = group["0"]
        assert isinstance(arr, zarr.Array)
        depth = volume.db_depth()
        if depth is None:
            wanted = self.db_depth or max(1, round(thickness_um / axial_um))
            depth = int(min(arr.shape[0], wanted))
        # dB volume pixel -> mosaic pixel -> canvas pixel
        matrix = to_canvas @ translation_matrix(
            origin[0] - mosaic.origin_px[0], origin[1] - mosaic.origin_px[1]
        )
        for d0 in range(0, depth, self.db_block):
            d1 = min(depth, d0 + self.db_block)
            block = np.full((d1 - d0, *arr.shape[1:]), np.nan, dtype=np.float32)
            hi = min(d1, arr.shape[0])
            if hi > d0:
                block[: hi - d0] = arr[d0:hi]
            warped = warp_stack(block, matrix, volume.canvas.shape, threads=self.threads)
            volume.write_db_block(z, d0, warped, depth, thickness_um / depth)
        return f"written ({depth} planes)"
