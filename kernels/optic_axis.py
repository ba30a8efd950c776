"""3-D optic axis and true birefringence from a normal and a tilted PS-OCT illumination.

The same per-pixel least-squares problem as psoct-toolbox's ``thruplane_registration`` (which
runs ``fminsearch`` from ``[0 0 0]`` on every pixel), solved for all pixels at once with a
batched Levenberg-Marquardt of fixed length. NumPy or CuPy (``xp``), one code path.

Model frame and conventions
---------------------------
* x, y span the section plane, z is the normal beam (k1 = (0, 0, 1)). In-plane angles run from
  +x towards +y: the apparent orientations given to :func:`solve_optic_axis` and returned by
  :func:`project` are in this frame, which is the toolbox's *negated* en-face orientation
  (``thruplane.m`` passes ``-ori`` to ``thruplane_registration``).
* The tilted beam is k2 = (sin g, 0, cos g) (g = ``gamma_deg``, toolbox default -15 deg): it
  is tilted in the x-z plane, about y. Its orientation is measured in the frame
  e1 = (cos g, 0, -sin g), e2 = (0, 1, 0) (e1 x e2 = k2), from e1 towards e2.
* The optic axis is x = dn * u with u a unit vector. A beam k sees the axis projected on the
  plane normal to k, scaled by sin^2 of the angle between u and k:
  apparent birefringence b_k = dn * (1 - (u.k)^2), apparent orientation = the direction of
  P_k u = u - (u.k) k in that beam's frame, modulo 180 deg.
* Outputs: azimuth theta [deg] in [-90, 90), from +x towards +y; inclination alpha [deg] in
  [-90, 90], the elevation of the axis out of the section plane, positive towards +z, for the
  representative of the axis with cos(theta) >= 0; delta_n (dimensionless, the units of the
  input birefringence); the unit axis (x, y, z) with u_x >= 0. The data are symmetric under
  (z, g) -> (-z, -g): solving with the wrong sign of gamma flips every alpha.

Objective (transcribed from the toolbox): with r_est(x; k) = (x - (k.x) k) sqrt(1 - (k.x)^2 /
|x|^2), minimise |r1 - r_est(x; k1)|^2 + |r2 - r_est(x; k2)|^2 over x in R^3, where
r1 = b_n (cos p_n, sin p_n, 0) and r2 = b_t (cos p_t e1 + sin p_t e2). Orientation is axial, so
each measured vector needs a sign; the toolbox's two branches are that choice:

* branch 1 (|phi_n| < 45 deg): p = phi (wrapped to [-90, 90)), i.e. the sign with cos p > 0;
* branch 2 (otherwise): the toolbox swaps x and y (phi -> 90 - phi, wrapped) and tilts about
  the other axis, k2' = (0, -sin g, cos g). That is the same objective under the rotation
  (x, y, z) -> (y, x, -z), with the sign of each measured vector chosen so that sin p >= 0.

The fit runs in the model frame for every pixel. Its minimiser is the toolbox's (mapped by the
rotation above). ``angles="toolbox"`` reproduces the toolbox's Theta/alpha exactly, including
its branch-2 inclination, ``asin(x'_3/|x|)`` in the swapped frame; there the swap is applied
to theta but not to the sign of z, so the toolbox's alpha has the wrong sign for axes with
theta in [45, 90) deg (its theta wrap flips the sign back for theta in (-90, -45]).
``angles="axis"`` (default) returns the consistent (theta, alpha) of the fitted axis.

Both branches fix the sign of the tilted vector in its own frame. In branch 1 that disagrees
with the normal view's sign when u_x and u.e1 have opposite signs, i.e. for g = -15 deg when
alpha < -atan(3.73 cos theta) (steeper than about -70 deg): no axis fits both signed vectors
and the toolbox's minimum, reproduced here, is biased. Branch 2 (both signs on +y) is immune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from .backend import ArrayModule, is_numpy, resolve_xp

__all__ = [
    "ApparentMap",
    "OpticAxisFit",
    "axis_rgb",
    "axis_weight",
    "inplane_rgb",
    "project",
    "solve_optic_axis",
    "through_plane_rgb",
]

DEFAULT_GAMMA_DEG = -15.0  # psoct-toolbox thruplane / thruplane_registration default
TOOLBOX_FLOOR = 1e-9  # the toolbox's replacement for negative/NaN birefringence, NaN angles
_TINY = 1e-30
_STEP_TOL = 1e-7  # a step below this fraction of |x| counts as converged


class ApparentMap(NamedTuple):
    """What one illumination measures: birefringence (units of delta-n) and the in-plane
    orientation [deg, -90..90) in that beam's frame."""

    birefringence: Any
    orientation_deg: Any


@dataclass(frozen=True)
class OpticAxisFit:
    """Per-pixel fit (float32 maps, NaN outside the mask).

    theta_deg: azimuth [deg], -90..90 from +x towards +y. alpha_deg: inclination [deg], -90..90,
    towards +z (see the module docstring for ``angles="toolbox"``). delta_n: true
    birefringence. axis: unit optic axis ``[..., 3]`` (x, y, z), u_x >= 0. cost: the toolbox's
    objective at the fit [delta-n^2]. residual: sqrt(cost / (b_n^2 + b_t^2)), 0 for a perfect
    fit. branch: the toolbox's branch (1: |phi_n| < 45 deg, 2: otherwise; 0 outside the mask).
    """

    theta_deg: Any
    alpha_deg: Any
    delta_n: Any
    axis: Any
    cost: Any
    residual: Any
    branch: Any

    @property
    def axis_dn(self) -> Any:
        """The axis scaled by delta-n, ``[..., 3]``."""
        return self.axis * self.delta_n[..., None]


# ------------------------------------------------------------------------------ forward model
def _wrap90(a: Any) -> Any:
    """Degrees wrapped into [-90, 90)."""
    return (a + 90.0) % 180.0 - 90.0


def _check_gamma(gamma_deg: float) -> tuple[float, float]:
    g = math.radians(float(gamma_deg))
    if abs(math.sin(g)) < 1e-6:
        raise ValueError("gamma_deg must be a non-zero tilt (the toolbox default is -15)")
    return math.cos(g), math.sin(g)


def project(
    theta_deg: Any,
    alpha_deg: Any,
    delta_n: Any,
    gamma_deg: float = DEFAULT_GAMMA_DEG,
    xp: ArrayModule | None = None,
) -> tuple[ApparentMap, ApparentMap]:
    """Apparent (birefringence, orientation) seen by the normal and the tilted beam.

    The physics the toolbox's objective assumes (module docstring): b = dn (1 - (u.k)^2) and the
    orientation of u projected on the plane normal to k, in [-90, 90) deg in that beam's frame.
    Returns ``(normal, tilted)``; float64.
    """
    xp = resolve_xp(xp, theta_deg, alpha_deg, delta_n)
    cg, sg = _check_gamma(gamma_deg)
    th = xp.deg2rad(xp.asarray(theta_deg, dtype=xp.float64))
    al = xp.deg2rad(xp.asarray(alpha_deg, dtype=xp.float64))
    dn = xp.asarray(delta_n, dtype=xp.float64)
    ux, uy, uz = xp.cos(al) * xp.cos(th), xp.cos(al) * xp.sin(th), xp.sin(al)
    a = cg * ux - sg * uz  # u.e1 of the tilted frame
    c = sg * ux + cg * uz  # u.k2
    normal = ApparentMap(dn * (1.0 - uz * uz), _wrap90(xp.rad2deg(xp.arctan2(uy, ux))))
    tilted = ApparentMap(dn * (1.0 - c * c), _wrap90(xp.rad2deg(xp.arctan2(uy, a))))
    return normal, tilted


# ------------------------------------------------------------------------------- the fit
def _residual(x: Any, y: Any, z: Any, r: tuple, cg: float, sg: float) -> tuple[tuple, Any]:
    """Residuals r - r_est (beam 1 in (x, y), beam 2 in (e1, e2)) and their squared sum."""
    inv_n = 1.0 / (x * x + y * y + z * z) ** 0.5
    a = cg * x - sg * z
    q1 = (x * x + y * y) ** 0.5 * inv_n
    q2 = (a * a + y * y) ** 0.5 * inv_n
    e = (r[0] - x * q1, r[1] - y * q1, r[2] - a * q2, r[3] - y * q2)
    return e, e[0] * e[0] + e[1] * e[1] + e[2] * e[2] + e[3] * e[3]


def _lm_step(x: Any, y: Any, z: Any, e: tuple, lam: Any, cg: float, sg: float) -> tuple:
    """Levenberg-Marquardt step (J^T J + lam diag(J^T J)) d = J^T e for every pixel.

    r_est = q p with p = A x (A: the beam's 2x3 frame), q = |p| / |x|, so
    d r_est / dx = q A + p (grad q)^T, grad q = A^T p / (|p| |x|) - q x / |x|^2.
    """
    w = 1.0 / (x * x + y * y + z * z)
    inv_n = w**0.5
    a = cg * x - sg * z
    s1 = (x * x + y * y + _TINY) ** 0.5
    s2 = (a * a + y * y + _TINY) ** 0.5
    q1, q2 = s1 * inv_n, s2 * inv_n
    h1, h2 = inv_n / s1, inv_n / s2
    q1w, q2w = q1 * w, q2 * w
    g1 = (h1 * x - q1w * x, h1 * y - q1w * y, -q1w * z)
    g2 = (h2 * cg * a - q2w * x, h2 * y - q2w * y, -h2 * sg * a - q2w * z)
    rows = (
        (q1 + x * g1[0], x * g1[1], x * g1[2]),
        (y * g1[0], q1 + y * g1[1], y * g1[2]),
        (q2 * cg + a * g2[0], a * g2[1], -q2 * sg + a * g2[2]),
        (y * g2[0], q2 + y * g2[1], y * g2[2]),
    )

    def dot(i: int, j: int) -> Any:
        return sum(row[i] * row[j] for row in rows)

    def grad(i: int) -> Any:
        return sum(row[i] * ek for row, ek in zip(rows, e, strict=True))

    damp = 1.0 + lam
    a11, a22, a33 = dot(0, 0) * damp + _TINY, dot(1, 1) * damp + _TINY, dot(2, 2) * damp + _TINY
    a12, a13, a23 = dot(0, 1), dot(0, 2), dot(1, 2)
    b1, b2, b3 = grad(0), grad(1), grad(2)
    c11 = a22 * a33 - a23 * a23
    c12 = a13 * a23 - a12 * a33
    c13 = a12 * a23 - a13 * a22
    c22 = a11 * a33 - a13 * a13
    c23 = a12 * a13 - a11 * a23
    c33 = a11 * a22 - a12 * a12
    inv_det = 1.0 / (a11 * c11 + a12 * c12 + a13 * c13)
    return (
        (c11 * b1 + c12 * b2 + c13 * b3) * inv_det,
        (c12 * b1 + c22 * b2 + c23 * b3) * inv_det,
        (c13 * b1 + c23 * b2 + c33 * b3) * inv_det,
    )


def _starts(r: tuple, cg: float, sg: float, xp: ArrayModule) -> list[tuple]:
    """Candidate starting axes (scaled units), exact for noise-free data in their regimes.

    * in plane: u = the normal view's direction, dn = b_n (what fminsearch reaches first from 0);
    * the two axes in the normal view's vertical plane whose birefringence ratio b_t / b_n
      matches: with t = tan(alpha), c = cos p_n, s = sin p_n,
      b_t / b_n = 1 + t^2 - (c sin g + t cos g)^2, so t = (c cos g +- sqrt(b_t/b_n - s^2)) / sin g;
    * the intersection of the two planes that contain each beam and its apparent axis.
    """
    bn = (r[0] * r[0] + r[1] * r[1]) ** 0.5
    bt = (r[2] * r[2] + r[3] * r[3]) ** 0.5
    c, s = r[0] / bn, r[1] / bn
    zero = xp.zeros_like(bn)
    out = [(r[0], r[1], zero)]
    disc = xp.maximum(bt / bn - s * s, 0.0) ** 0.5
    for sign in (1.0, -1.0):
        t = (c * cg + sign * disc) / sg
        d = bn * (1.0 + t * t)
        out.append(
            (
                d * c / (1.0 + t * t) ** 0.5,
                d * s / (1.0 + t * t) ** 0.5,
                d * t / (1.0 + t * t) ** 0.5,
            )
        )
    # plane normals n1 = k1 x w1, n2 = k2 x w2 (k2 x e1 = e2, k2 x e2 = -e1); u ~ n1 x n2
    ct, st = r[2] / bt, r[3] / bt
    n1 = (-s, c)  # third component 0
    n2 = (-st * cg, ct, st * sg)
    u = (n1[1] * n2[2], -n1[0] * n2[2], n1[0] * n2[1] - n1[1] * n2[0])
    norm = (u[0] * u[0] + u[1] * u[1] + u[2] * u[2] + _TINY) ** 0.5
    sign = xp.where(u[0] * c + u[1] * s < 0, -1.0, 1.0) / norm
    u = (u[0] * sign, u[1] * sign, u[2] * sign)
    d = bn / xp.maximum(u[0] * u[0] + u[1] * u[1], 0.01)  # |dn| <= 100 b_n
    out.append((u[0] * d, u[1] * d, u[2] * d))
    return out


def _lm(state: list, r: tuple, cg: float, sg: float, iterations: int, xp: ArrayModule) -> tuple:
    """``iterations`` Levenberg-Marquardt steps on state [x, y, z, e1..e4, cost, lambda];
    returns the new state and whether each pixel's last proposed step was not negligible."""
    x, y, z, e, cost, lam = state[0], state[1], state[2], tuple(state[3:7]), state[7], state[8]
    moving = xp.ones(x.shape, dtype=bool)
    for _ in range(iterations):
        dx, dy, dz = _lm_step(x, y, z, e, lam, cg, sg)
        xn, yn, zn = x + dx, y + dy, z + dz
        en, cn = _residual(xn, yn, zn, r, cg, sg)
        ok = cn < cost  # NaN trials are rejected
        x, y, z = xp.where(ok, xn, x), xp.where(ok, yn, y), xp.where(ok, zn, z)
        e = tuple(xp.where(ok, new, old) for new, old in zip(en, e, strict=True))
        cost = xp.where(ok, cn, cost)
        lam = xp.where(ok, xp.maximum(lam * 0.3, 1e-12), xp.minimum(lam * 10.0, 1e10))
        moving = (dx * dx + dy * dy + dz * dz) > _STEP_TOL**2 * (x * x + y * y + z * z)
    return [x, y, z, *e, cost, lam], moving


def _fit_chunk(
    bn: Any,
    on: Any,
    bt: Any,
    ot: Any,
    cg: float,
    sg: float,
    iterations: int,
    polish_iterations: int,
    xp: ArrayModule,
) -> tuple[Any, Any, Any, Any, Any]:
    """Fit flat float64 arrays; returns x, y, z (model frame, delta-n units), cost, branch1."""
    on, ot = _wrap90(on), _wrap90(ot)
    branch1 = xp.abs(on) < 45.0
    # branch 2: the toolbox's x<->y swap picks the sign with sin p >= 0, i.e. p in [0, 180)
    pn = xp.deg2rad(xp.where(branch1, on, on % 180.0))
    pt = xp.deg2rad(xp.where(branch1, ot, ot % 180.0))
    scale = (bn * bn + bt * bt) ** 0.5  # solve in units of |(b_n, b_t)|: scale-free LM
    scale = xp.where(scale > 0, scale, xp.nan)  # no signal in either view: NaN
    # a view with exactly zero birefringence has no direction: 1e-12 of the other keeps the
    # starts defined and changes the objective by 1e-24 (relative)
    bn_s, bt_s = xp.maximum(bn / scale, 1e-12), xp.maximum(bt / scale, 1e-12)
    r = (bn_s * xp.cos(pn), bn_s * xp.sin(pn), bt_s * xp.cos(pt), bt_s * xp.sin(pt))
    best = None
    for x, y, z in _starts(r, cg, sg, xp):
        _, cost = _residual(x, y, z, r, cg, sg)
        cost = xp.where(xp.isfinite(cost), cost, xp.inf)
        if best is None:
            best = [x, y, z, cost]
        else:
            ok = cost < best[3]
            best = [xp.where(ok, new, old) for new, old in zip((x, y, z, cost), best, strict=True)]
    x, y, z, _ = best
    e, cost = _residual(x, y, z, r, cg, sg)
    state = [x, y, z, *e, cost, xp.full_like(x, 1e-3)]
    state, moving = _lm(state, r, cg, sg, iterations, xp)
    # pixels still moving (ill-conditioned, mostly steep axes): more steps on those only
    active = xp.nonzero(moving)[0]
    if polish_iterations > 0 and int(active.size) > 0:
        sub = [v[active] for v in state]
        sub, _ = _lm(sub, tuple(v[active] for v in r), cg, sg, polish_iterations, xp)
        for v, w in zip(state, sub, strict=True):
            v[active] = w
    x, y, z, cost = state[0], state[1], state[2], state[7]
    return x * scale, y * scale, z * scale, cost * scale * scale, branch1


def solve_optic_axis(
    biref_normal: Any,
    orientation_normal_deg: Any,
    biref_tilted: Any,
    orientation_tilted_deg: Any,
    gamma_deg: float = DEFAULT_GAMMA_DEG,
    mask: Any = None,
    iterations: int = 10,
    polish_iterations: int = 40,
    angles: Literal["axis", "toolbox"] = "axis",
    chunk: int | None = None,
    xp: ArrayModule | None = None,
) -> OpticAxisFit:
    """3-D optic axis, inclination and true birefringence per pixel (see module docstring).

    Inputs are registered maps of one shape: apparent birefringence (delta-n units) and
    apparent orientation [deg] of the normal and the tilted illumination, orientations in the
    model frame (the toolbox's ``-ori``). As in the toolbox, negative or non-finite
    birefringence becomes 1e-9 and NaN orientation 1e-9 deg; pixels outside ``mask`` and
    pixels with zero birefringence in both views are NaN.
    ``iterations``: Levenberg-Marquardt steps for every pixel from the best of four analytic
    starts; ``polish_iterations``: further steps for the pixels whose last step was still
    larger than 1e-7 |x| (a few per thousand, mostly steep axes).
    ``chunk``: pixels per batch (memory ~ 100 float64 temporaries per pixel).
    """
    if angles not in ("axis", "toolbox"):
        raise ValueError(f"angles must be 'axis' or 'toolbox', got {angles!r}")
    xp = resolve_xp(xp, biref_normal, orientation_normal_deg, biref_tilted, orientation_tilted_deg)
    cg, sg = _check_gamma(gamma_deg)
    maps = [
        xp.asarray(m)
        for m in (biref_normal, orientation_normal_deg, biref_tilted, orientation_tilted_deg)
    ]
    shape = maps[0].shape
    if any(m.shape != shape for m in maps):
        raise ValueError(f"input maps differ in shape: {[m.shape for m in maps]}")
    flat = [m.reshape(-1) for m in maps]
    if mask is None:
        index = None
        n = flat[0].size
    else:
        mask = xp.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"mask shape {mask.shape} != map shape {shape}")
        index = xp.nonzero(mask.reshape(-1))[0]
        n = int(index.size)
    size = int(flat[0].size)
    out = {
        k: xp.full(size, math.nan, dtype=xp.float32)
        for k in ("theta", "alpha", "dn", "ux", "uy", "uz", "cost", "residual")
    }
    branch = xp.zeros(size, dtype=xp.int8)
    if chunk is None:
        chunk = 1 << 18 if is_numpy(xp) else 1 << 22
    for start in range(0, n, chunk):
        sel = slice(start, min(start + chunk, n))
        idx = xp.arange(sel.start, sel.stop) if index is None else index[sel]
        bn, on, bt, ot = (m[idx].astype(xp.float64) for m in flat)
        bad_b = ~(bn >= 0) | ~xp.isfinite(bn)  # NaN, inf, negative
        bn = xp.where(bad_b, TOOLBOX_FLOOR, bn)
        bad_b = ~(bt >= 0) | ~xp.isfinite(bt)
        bt = xp.where(bad_b, TOOLBOX_FLOOR, bt)
        on = xp.where(xp.isnan(on), TOOLBOX_FLOOR, on)
        ot = xp.where(xp.isnan(ot), TOOLBOX_FLOOR, ot)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # NumPy only
            x, y, z, cost, branch1 = _fit_chunk(
                bn, on, bt, ot, cg, sg, iterations, polish_iterations, xp
            )
        dn = (x * x + y * y + z * z) ** 0.5
        sin_el = xp.clip(z / dn, -1.0, 1.0)
        flip = xp.where(x < 0, -1.0, 1.0)  # representative with u_x >= 0
        theta = _wrap90(xp.rad2deg(xp.arctan2(y, x)))
        # "toolbox": its asin(x'_3 / |x|), x' = (y, x, -z) in branch 2
        el = xp.where(branch1, sin_el, -sin_el) if angles == "toolbox" else sin_el * flip
        out["theta"][idx] = theta
        out["alpha"][idx] = xp.rad2deg(xp.arcsin(el))
        out["dn"][idx] = dn
        out["ux"][idx] = x * flip / dn
        out["uy"][idx] = y * flip / dn
        out["uz"][idx] = z * flip / dn
        out["cost"][idx] = cost
        out["residual"][idx] = (cost / (bn * bn + bt * bt)) ** 0.5
        branch[idx] = xp.where(branch1, 1, 2).astype(xp.int8)
    axis = xp.stack([out["ux"], out["uy"], out["uz"]], axis=-1).reshape(*shape, 3)
    return OpticAxisFit(
        theta_deg=out["theta"].reshape(shape),
        alpha_deg=out["alpha"].reshape(shape),
        delta_n=out["dn"].reshape(shape),
        axis=axis,
        cost=out["cost"].reshape(shape),
        residual=out["residual"].reshape(shape),
        branch=branch.reshape(shape),
    )


# ------------------------------------------------------------------------------ previews
def _hsv_full_saturation(h: Any, v: Any, xp: ArrayModule) -> Any:
    """HSV -> RGB with S = 1 (MATLAB hsv2rgb), h and v in [0, 1]; ``[..., 3]`` float32."""
    h6 = h * 6.0
    rgb = [v * xp.clip(xp.abs((h6 + k) % 6.0 - 3.0) - 1.0, 0.0, 1.0) for k in (0.0, 4.0, 2.0)]
    return xp.stack(rgb, axis=-1).astype(xp.float32)


def _value(delta_n: Any, dn_min: float, dn_max: float, xp: ArrayModule) -> Any:
    v = (xp.asarray(delta_n, dtype=xp.float64) - dn_min) / (dn_max - dn_min)
    return xp.clip(xp.where(xp.isfinite(v), v, 0.0), 0.0, 1.0)


def inplane_rgb(
    theta_deg: Any, delta_n: Any, dn_min: float, dn_max: float, xp: ArrayModule | None = None
) -> Any:
    """In-plane colour (the toolbox's inplaneRgb): hue = (theta + 90) / 180 (-90 deg red,
    -30 green, +30 blue), full saturation, value = delta-n mapped linearly from
    [dn_min, dn_max] to [0, 1]. The toolbox uses medfilt2(dn, [2 2]) with dn_min = 1.3e-7 and
    dn_max = 2.3e-7 in its units. ``[..., 3]`` float32 in [0, 1]; NaN pixels are black."""
    xp = resolve_xp(xp, theta_deg, delta_n)
    hue = xp.clip((xp.asarray(theta_deg, dtype=xp.float64) + 90.0) / 180.0, 0.0, 1.0)
    hue = xp.where(xp.isfinite(hue), hue, 0.0)
    return _hsv_full_saturation(hue, _value(delta_n, dn_min, dn_max, xp), xp)


def through_plane_rgb(
    alpha_deg: Any, delta_n: Any, dn_min: float, dn_max: float, xp: ArrayModule | None = None
) -> Any:
    """Through-plane colour (the toolbox's alphaRgb): hue = (alpha + 90) / 180, value as in
    :func:`inplane_rgb` (alpha = 0, in the section plane, is cyan)."""
    return inplane_rgb(alpha_deg, delta_n, dn_min, dn_max, xp)


def axis_weight(delta_n: Any, xp: ArrayModule | None = None) -> Any:
    """The toolbox's brightness for the axis map, clip((dn - P1) / P20, 0, 1) with P1, P20
    the 1st and 20th percentiles of the finite delta-n (as written: divided by P20, not by
    P20 - P1). Float32, 0 where dn is not finite."""
    xp = resolve_xp(xp, delta_n)
    dn = xp.asarray(delta_n, dtype=xp.float64)
    finite = dn[xp.isfinite(dn)]
    if finite.size == 0:
        return xp.zeros(dn.shape, dtype=xp.float32)
    p1, p20 = (float(v) for v in xp.percentile(finite, xp.asarray([1.0, 20.0])))
    w = (dn - p1) / (p20 if p20 != 0 else 1.0)
    return xp.clip(xp.where(xp.isfinite(w), w, 0.0), 0.0, 1.0).astype(xp.float32)


def axis_rgb(axis: Any, weight: Any, xp: ArrayModule | None = None) -> Any:
    """Axis colour: |u| components times ``weight`` in the toolbox's channel order
    (R, G, B) = |(-u_x, u_z, u_y)| (its ``abs(oct_vec_3d)``): red in-plane along x, blue
    in-plane along y, green through the plane. ``[..., 3]`` float32; NaN -> 0."""
    xp = resolve_xp(xp, axis, weight)
    u = xp.asarray(axis, dtype=xp.float64)
    rgb = xp.abs(xp.stack([u[..., 0], u[..., 2], u[..., 1]], axis=-1))
    rgb = rgb * xp.asarray(weight, dtype=xp.float64)[..., None]
    return xp.clip(xp.where(xp.isfinite(rgb), rgb, 0.0), 0.0, 1.0).astype(xp.float32)
