"""The register stage's thru-plane step: tilted mosaic -> normal mosaic -> 3-D optic axis.

On the register hosts, in the register stage (it already consumes every `slice_stitched` and
holds the KV bookkeeping and the volumes): when both mosaics of a slice are stitched, the
normal one (the stage's `mosaic`, 0) and a tilted one (`tilt_deg` != 0 in its attributes, or
`axis_mosaic`), :func:`kernels.thruplane.thruplane` registers the tilted birefringence map onto
the normal one (affine, initialised from the two mosaics' stage geometry), resamples the tilted
maps into the normal mosaic's frame and fits the axis on the pixels inside both masks. The
products are written to :func:`services.io.layout.axis_path` (an OME-Zarr in the normal mosaic's
frame, channels :data:`kernels.thruplane.CHANNELS`, units and conventions in its attributes)
and `slice_axis` is published with the transform and quality figures.

Bookkeeping (KV `tp-lattice`, register's own keys): `<acq>.register.axis.<slice>.m<M>` per
stitched mosaic (path, inputs, illumination, tilt) and `<acq>.register.axis.<slice>.done` (the
result and its basis: both mosaics' inputs and the options). Whichever mosaic is stitched last
triggers the step; a redelivery finds the same basis done and its store present and
republishes the event without recomputing; a replay (`tilepipe replay register`) recomputes.

Stacking: once a slice is both registered (slice to slice) and has its axis products, they are
resampled with the slice's transform into :func:`services.io.layout.axis_volume_path`, a volume
parallel to the registered one (same canvas, z = slice; channels
:data:`AXIS_VOLUME_CHANNELS`). Azimuth is interpolated as doubled angles, inclination as the
vector (alpha cos theta, alpha sin theta), which is continuous where the azimuth wraps and the
axis representative (u_x >= 0) flips the sign of alpha; the axis is recomputed from both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prometheus_client import Counter, Histogram

from kernels.backend import get_xp
from kernels.register import RegisterParams, warp_stack
from kernels.thruplane import AXIAL_CHANNELS, UNITS, ThruPlaneParams, thruplane, tissue_mask
from messages.events import SliceAxis
from services.core.manifest import default_mask_threshold
from services.io.layout import axis_path
from services.io.omezarr import write_omezarr
from services.runtime.options import StageOptions
from services.state.buckets import Buckets, KeyValue
from services.state.lattice import LATTICE_BUCKET, SliceBook

AXIS_SLICES = Counter(
    "tilepipe_register_axis_slices_total",
    "Slices whose 3-D optic axis was fitted, by outcome (accepted; rejected: the thru-plane "
    "registration was below quality and the stage geometry was used).",
    ["outcome"],
)
AXIS_QUALITY = Histogram(
    "tilepipe_register_axis_quality",
    "Quality (weighted NCC) of thru-plane (tilted -> normal) registrations.",
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)

AXIS_VOLUME_CHANNELS = ("delta_n", "inclination", "azimuth", "axis_x", "axis_y", "axis_z", "mask")
AXIS_VOLUME_AXIAL = ("azimuth",)
# psoct-toolbox's orientation convention (its sign and phaseOffset): the model frame of
# kernels.optic_axis is minus this orientation (thruplane.m passes -ori)
TOOLBOX_SIGN, TOOLBOX_OFFSET_DEG = -1, 100.0
MODEL = (
    "per pixel, the optic axis x = dn u whose projections perpendicular to the normal beam "
    "k1 = (0, 0, 1) and the tilted beam k2 = (sin g, 0, cos g) reproduce the two apparent "
    "birefringence vectors (kernels.optic_axis, psoct-toolbox thruplane_registration)"
)


@dataclass(frozen=True)
class AxisOptions:
    """The register stage's `axis*` options."""

    enabled: bool = True  # `axis`
    tilted_mosaic: int | None = None  # `axis_mosaic`: default, the first tilted one
    min_quality: float = 0.2  # `axis_min_quality`
    max_rotation_deg: float = 5.0  # `axis_max_rotation_deg`
    max_scale_change: float = 0.1  # `axis_max_scale_change`
    smooth_sigma_px: float = 3.0  # `axis_smooth_sigma_px`
    dn_range: tuple[float, float] | None = None  # `axis_dn_range` (previews; None: P1..P99)
    device: str = "cpu"  # `axis_device`: the fit on "cpu", "gpu" or "auto"

    def params(self, gamma_deg: float, threads: int) -> ThruPlaneParams:
        return ThruPlaneParams(
            gamma_deg=gamma_deg,
            smooth_sigma_px=self.smooth_sigma_px,
            register=RegisterParams(
                model="affine",
                max_rotation_deg=self.max_rotation_deg,
                max_scale_change=self.max_scale_change,
                min_quality=self.min_quality,
            ),
            dn_range=self.dn_range,
            threads=threads,
        )


_AXIS = AxisOptions()


class AxisOptionFields(StageOptions):
    """The register stage's options of its thru-plane step: `axis_<name>` sets
    `AxisOptions.<name>` (`axis`: enabled, `axis_mosaic`: tilted_mosaic)."""

    axis: bool = _AXIS.enabled
    """fit the 3-D optic axis"""
    axis_mosaic: int | None = _AXIS.tilted_mosaic
    """the tilted mosaic; none: the first tilted one"""
    axis_min_quality: float = _AXIS.min_quality
    """tilted-onto-normal registrations below it fail"""
    axis_max_rotation_deg: float = _AXIS.max_rotation_deg
    """rotation searched, tilted onto normal"""
    axis_max_scale_change: float = _AXIS.max_scale_change
    """|scale - 1| searched and accepted"""
    axis_smooth_sigma_px: float = _AXIS.smooth_sigma_px
    """Gaussian smoothing before the fit"""
    axis_dn_range: tuple[float, float] | None = _AXIS.dn_range
    """previews' delta-n range; none: P1..P99"""
    axis_device: Literal["cpu", "gpu", "auto"] = _AXIS.device
    """where the fit runs"""

    def axis_options(self) -> AxisOptions:
        renamed = {"enabled": "axis", "tilted_mosaic": "axis_mosaic"}
        return AxisOptions(
            **{
                f.name: getattr(self, renamed.get(f.name, f"axis_{f.name}"))
                for f in dataclasses.fields(AxisOptions)
            }
        )


class AxisBook(SliceBook):
    """Thru-plane state of one acquisition in KV `tp-lattice` (keys of the register stage:
    `<slice>.m<mosaic>|done`); records are made strict JSON (`_json_safe`)."""

    def __init__(self, kv: KeyValue, acq: str) -> None:
        super().__init__(kv, f"{acq}.register.axis")

    @staticmethod
    async def open(buckets: Buckets, acq: str) -> AxisBook:
        return AxisBook(await buckets.kv(LATTICE_BUCKET), acq)

    async def put(self, slice_index: int, part: str, record: dict) -> None:
        await super().put(slice_index, part, _json_safe(record))


def _json_safe(value: Any) -> Any:
    """NaN and infinities -> None, NumPy scalars -> Python (strict JSON for KV and Zarr)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def pick_tilted(records: dict[str, dict], normal: int, wanted: int | None) -> int | None:
    """The tilted mosaic of a slice among its stitched mosaics' records ("m<M>" -> record)."""
    if wanted is not None:
        return wanted if f"m{wanted}" in records else None
    tilted = sorted(
        int(part[1:])
        for part, rec in records.items()
        if part[:1] == "m"
        and part[1:].isdigit()
        and int(part[1:]) != normal
        and float(rec.get("tilt_deg") or 0.0) != 0.0
    )
    return tilted[0] if tilted else None


def stage_prior(tilted, normal) -> np.ndarray:
    """Tilted mosaic pixel -> normal mosaic pixel from the stage geometry (origins, pixel
    sizes; no sample motion). `tilted`/`normal`: :class:`services.stages.register.Mosaic`."""
    (pty, ptx), (pny, pnx) = tilted.pixel_size_um, normal.pixel_size_um
    oy = tilted.origin_px[0] * pty - normal.origin_px[0] * pny
    ox = tilted.origin_px[1] * ptx - normal.origin_px[1] * pnx
    return np.array([[pty / pny, 0.0, oy / pny], [0.0, ptx / pnx, ox / pnx], [0.0, 0.0, 1.0]])


def toolbox_orientation(orientation: np.ndarray, attrs: dict) -> np.ndarray:
    """A mosaic's orientation [deg] in psoct-toolbox's convention (sign -1, phaseOffset 100):
    the processing wrote sign * (arg J1 - arg J2) / 2 + offset (its `orientation_convention`
    attributes; absent: the toolbox's own), so the phase difference, and the toolbox's value,
    follow exactly."""
    conv = attrs.get("orientation_convention") or {}
    sign = int(conv.get("orientation_sign", TOOLBOX_SIGN))
    offset = float(conv.get("orientation_offset_deg", TOOLBOX_OFFSET_DEG))
    if (sign, offset) == (TOOLBOX_SIGN, TOOLBOX_OFFSET_DEG):
        return orientation
    half_phase = sign * (orientation - offset)
    out = TOOLBOX_SIGN * half_phase + TOOLBOX_OFFSET_DEG
    return ((out + 90.0) % 180.0 - 90.0).astype(np.float32)


def en_face_maps(mosaic) -> dict[str, np.ndarray]:
    """Birefringence, orientation (toolbox convention) and mask of a stitched mosaic (the mask
    from its AIP with the lab's defaults when the store has none)."""
    names = mosaic.channels
    attrs = mosaic.attrs

    def channel(name: str) -> np.ndarray:
        if name not in names:
            raise ValueError(f"mosaic {mosaic.path} has no {name} channel")
        return mosaic.read(name)

    if "mask" in names:
        mask = channel("mask")
    else:
        threshold = (attrs.get("mask") or {}).get("threshold_db")
        if threshold is None:
            threshold = default_mask_threshold(
                str(attrs.get("illumination", "normal")), float(attrs.get("tilt_deg") or 0.0)
            )
        mask = tissue_mask(channel("aip"), float(threshold))
    return {
        "birefringence": channel("birefringence"),
        "orientation": toolbox_orientation(channel("orientation"), attrs),
        "mask": mask,
    }


def compute_axis(
    acq: str,
    j: int,
    normal,
    tilted,
    tilted_index: int,
    options: AxisOptions,
    basis: str,
    inputs: dict,
    output: Path,
    rel: str,
    threads: int,
) -> dict:
    """Fit slice j's axis from its two mosaics, write the products; returns the record."""
    gamma = float(tilted.attrs.get("tilt_deg") or 0.0)
    if gamma == 0.0:
        raise ValueError(f"mosaic {tilted.path} has no tilt: not a tilted illumination")
    init = stage_prior(tilted, normal)
    xp = get_xp(options.device) if options.device != "cpu" else None
    result = thruplane(
        en_face_maps(normal), en_face_maps(tilted), init, options.params(gamma, threads), xp
    )
    reg, fig = result.registration, result.figures
    outcome = "accepted" if reg.accepted else "rejected"
    AXIS_SLICES.labels(outcome).inc()
    AXIS_QUALITY.observe(max(0.0, reg.quality))
    record = {
        "basis": basis,
        "path": rel,
        "tilted_mosaic": tilted_index,
        "transform": result.matrix.tolist(),
        "estimate": reg.matrix.tolist(),
        "prior": init.tolist(),
        "quality": float(reg.quality),
        "overlap": float(reg.overlap),
        "accepted": bool(reg.accepted),
        "reason": reg.reason,
        "gamma_deg": gamma,
        "figures": {k: v for k, v in fig.items()},
    }
    py, px = normal.pixel_size_um
    write_omezarr(
        output,
        result.stack,
        channel_names=list(result.products),
        pixel_size_um=(py, px),
        origin_um=(normal.origin_px[0] * py, normal.origin_px[1] * px),
        axial_channels=AXIAL_CHANNELS,
        attributes=_json_safe(
            {
                "acq": acq,
                "slice": j,
                "normal_mosaic": normal.attrs.get("mosaic"),
                "tilted_mosaic": tilted_index,
                "units": UNITS,
                "model": MODEL,
                "conventions": {
                    "frame": "x, y in the section plane, z along the normal beam; the tilted "
                    "beam is tilted by gamma_deg in the x-z plane (about y)",
                    "azimuth": "from +x towards +y; minus the normal mosaic's orientation "
                    "(psoct-toolbox convention) for an axis in the section plane",
                    "inclination": "elevation towards +z, for the axis representative with "
                    "u_x >= 0",
                    "orientation_input": "the mosaics' orientation converted to "
                    "psoct-toolbox's convention, negated (thruplane.m's -ori)",
                    "frame_of_products": "the normal mosaic's pixels (same origin and size)",
                },
                "gamma_deg": gamma,
                "transform_tilted_to_normal": record["transform"],
                "registration": {
                    k: record[k] for k in ("quality", "overlap", "accepted", "reason", "prior")
                },
                "figures": record["figures"],
                "inputs": inputs,
                "basis": basis,
            }
        ),
    )
    return _json_safe(record)


def axis_event(
    acq: str,
    j: int,
    normal_mosaic: int,
    rec: dict,
    producer: str,
    exports: dict[str, str] | None = None,
) -> SliceAxis:
    fig = rec.get("figures", {})
    return SliceAxis(
        acq=acq,
        slice=j,
        mosaic=normal_mosaic,
        path=rec["path"],
        tilted_mosaic=rec["tilted_mosaic"],
        transform=rec["transform"],
        quality=rec["quality"],
        overlap=rec["overlap"],
        accepted=rec["accepted"],
        reason=rec.get("reason", "")[:8000],
        gamma_deg=rec["gamma_deg"],
        fitted_px=int(fig.get("fitted_px") or 0),
        fitted_fraction=float(fig.get("fitted_fraction") or 0.0),
        residual_median=fig.get("residual_median"),
        residual_p95=fig.get("residual_p95"),
        delta_n_median=fig.get("delta_n_median"),
        basis=rec.get("basis", ""),
        exports=exports or {},
        producer=producer,
    )


def is_done(output: Path, rec: dict | None, basis: str) -> bool:
    """Whether a slice's axis products were made from this basis and are on disk."""
    if rec is None or rec.get("basis") != basis:
        return False
    try:
        meta = json.loads((output / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("attributes", {}).get("tilepipe", {}).get("basis") == basis


# ---------------------------------------------------------------------------- stacking
def warp_axis(products: dict[str, np.ndarray], matrix: np.ndarray, shape, threads: int):
    """Slice axis products -> ``(c, y, x)`` in :data:`AXIS_VOLUME_CHANNELS` order, resampled
    into a target frame (``matrix``: product pixel -> target pixel), axis-aware (module doc)."""
    theta = products["azimuth"].astype(np.float64)
    alpha = products["inclination"].astype(np.float64)
    rad = np.deg2rad(theta)
    src = np.stack(
        [
            products["delta_n"],
            theta,
            alpha * np.cos(rad),
            alpha * np.sin(rad),
            products["mask"],
        ]
    ).astype(np.float32)
    dn, th, a_c, a_s, mask = warp_stack(
        src, matrix, shape, axial=[False, True, False, False, False], threads=threads
    )
    t = np.deg2rad(th.astype(np.float64))
    al = np.clip(a_c * np.cos(t) + a_s * np.sin(t), -90.0, 90.0)
    ar = np.deg2rad(al)
    out = np.stack(
        [
            dn,
            al,
            th,
            np.cos(ar) * np.cos(t),
            np.cos(ar) * np.sin(t),
            np.sin(ar),
            mask,
        ]
    ).astype(np.float32)
    return out


def axis_canvas(canvas):
    """The registered volume's canvas with the axis volume's channels."""
    return dataclasses.replace(canvas, channels=AXIS_VOLUME_CHANNELS, axial=AXIS_VOLUME_AXIAL)


__all__ = [
    "AXIS_VOLUME_CHANNELS",
    "AxisBook",
    "AxisOptions",
    "axis_canvas",
    "axis_event",
    "axis_path",
    "compute_axis",
    "digest",
    "en_face_maps",
    "is_done",
    "pick_tilted",
    "stage_prior",
    "toolbox_orientation",
    "warp_axis",
]
