"""PS-OCT products from the two Jones components J1, J2 (psoct-toolbox conventions).

* reflectivity [dB] = 10*log10(|J1|^2 + |J2|^2)
* retardance [deg] = atan(|J1| / |J2|), in [0, 90]
* optic-axis orientation [deg] = wrap(sign*(arg J1 - arg J2) + 2*offset) / 2, in [-90, 90):
  the channel phase difference is twice the axis angle, as in psoct-toolbox's complex2volumes
  (``phi = angle(J1) - angle(J2)``, negated by flipPhase, plus 2*phaseOffset, wrapped, halved).
  With ``cal.orientation_wrap == "once"`` the wrap is the toolbox's single +-2*pi step applied
  to the difference of the two phases, so a few voxels stay above 90 deg (up to 90 + offset).

All outputs are float32 with the channel axis removed: J ``[..., 2, A, Z]`` -> ``[..., A, Z]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .backend import ArrayModule, resolve_xp
from .calibration import SpectrometerCalibration
from .fastmath import atan_ratio_of_powers, half_angle

__all__ = [
    "PSVolumes",
    "channel_power",
    "orientation_deg",
    "ps_products",
    "reflectivity_db",
    "retardance_deg",
]

_DB_PER_NEPER = 10.0 / math.log(10.0)
_POWER_FLOOR = 1e-30


@dataclass(frozen=True)
class PSVolumes:
    """Reflectivity [dB], retardance [deg], orientation [deg]; float32, same shape."""

    db: Any
    retardance: Any
    orientation: Any


def channel_power(j: Any) -> Any:
    """|J|^2 as float32."""
    re, im = j.real, j.imag
    p = re * re
    p += im * im
    return p


def _db(p1: Any, p2: Any, xp: ArrayModule) -> Any:
    s = p1 + p2
    xp.maximum(s, _POWER_FLOOR, out=s)
    out = xp.log(s)
    out *= _DB_PER_NEPER
    return out


def _orientation(
    j1: Any, j2: Any, p1: Any, p2: Any, offset_deg: float, sign: int, xp: ArrayModule
) -> Any:
    a1, b1, a2, b2 = j1.real, j1.imag, j2.real, j2.imag
    re = a1 * a2
    re += b1 * b2
    im = b1 * a2
    im -= a1 * b2  # re + i*im = J1 * conj(J2)
    if sign < 0:
        im = -im
    if offset_deg:
        c, s = math.cos(math.radians(2 * offset_deg)), math.sin(math.radians(2 * offset_deg))
        re, im = re * c - im * s, re * s + im * c
    modulus = p1 * p2
    xp.sqrt(modulus, out=modulus)
    return half_angle(re, im, modulus, xp, degrees=True)


def _orientation_wrapped_once(j1: Any, j2: Any, offset_deg: float, sign: int, xp: Any) -> Any:
    """psoct-toolbox's orientation: (sign*(arg J1 - arg J2) + 2*offset), one wrap step, / 2."""
    phi = xp.arctan2(j1.imag, j1.real)
    phi -= xp.arctan2(j2.imag, j2.real)
    if sign < 0:
        phi = -phi
    phi += math.radians(2 * offset_deg)
    phi = xp.where(phi > math.pi, phi - 2 * math.pi, phi)
    phi = xp.where(phi < -math.pi, phi + 2 * math.pi, phi)
    phi *= 90.0 / math.pi
    return phi.astype(xp.float32)


def reflectivity_db(j1: Any, j2: Any, xp: ArrayModule | None = None) -> Any:
    """10*log10(|J1|^2 + |J2|^2), float32."""
    xp = resolve_xp(xp, j1, j2)
    return _db(channel_power(j1), channel_power(j2), xp)


def retardance_deg(j1: Any, j2: Any, xp: ArrayModule | None = None) -> Any:
    """atan(|J1| / |J2|) in degrees, [0, 90], float32."""
    xp = resolve_xp(xp, j1, j2)
    return atan_ratio_of_powers(channel_power(j1), channel_power(j2), xp, degrees=True)


def orientation_deg(
    j1: Any, j2: Any, offset_deg: float = 0.0, sign: int = 1, xp: ArrayModule | None = None
) -> Any:
    """Optic-axis orientation in degrees, [-90, 90): wrap(sign*(arg J1 - arg J2) + 2*offset)/2."""
    xp = resolve_xp(xp, j1, j2)
    return _orientation(j1, j2, channel_power(j1), channel_power(j2), offset_deg, sign, xp)


def ps_products(
    jones: Any, cal: SpectrometerCalibration | None = None, xp: ArrayModule | None = None
) -> PSVolumes:
    """All three products from ``jones[..., 2, A, Z]`` (channel axis -3), sharing |J|^2.

    Orientation offset and sign come from ``cal`` (none / +1 when ``cal`` is None).
    """
    xp = resolve_xp(xp, jones)
    if jones.ndim < 3 or jones.shape[-3] != 2:
        raise ValueError(f"jones must have shape (..., 2, A, Z), got {tuple(jones.shape)}")
    j1, j2 = jones[..., 0, :, :], jones[..., 1, :, :]
    p1, p2 = channel_power(j1), channel_power(j2)
    offset = cal.orientation_offset_deg if cal is not None else 0.0
    sign = cal.orientation_sign if cal is not None else 1
    if cal is not None and cal.orientation_wrap == "once":
        orientation = _orientation_wrapped_once(j1, j2, offset, sign, xp)
    else:
        orientation = _orientation(j1, j2, p1, p2, offset, sign, xp)
    return PSVolumes(
        db=_db(p1, p2, xp),
        retardance=atan_ratio_of_powers(p1, p2, xp, degrees=True),
        orientation=orientation,
    )
