"""Array-module dispatch: the same kernels run on NumPy (CPU) or CuPy (GPU).

Kernels never call ``np.`` on their inputs; they take an ``xp`` module (``numpy`` or ``cupy``)
or infer it from their array arguments with :func:`array_module`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

ArrayModule = ModuleType

__all__ = [
    "ArrayModule",
    "array_module",
    "device_key",
    "device_name",
    "get_xp",
    "gpu_available",
    "is_numpy",
    "resolve_xp",
    "to_host",
]


def _import_cupy() -> ModuleType | None:
    try:
        return importlib.import_module("cupy")
    except Exception:  # ImportError, or CUDA runtime errors raised while importing
        return None


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device is visible."""
    cupy = _import_cupy()
    if cupy is None:
        return False
    try:
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


def get_xp(device: str = "auto") -> ArrayModule:
    """Array module for ``device``: "auto" (CuPy if a GPU is usable, else NumPy), "cpu", "gpu"."""
    if device == "cpu":
        return np
    if device == "auto":
        return _import_cupy() if gpu_available() else np  # type: ignore[return-value]
    if device == "gpu":
        if not gpu_available():
            raise RuntimeError(
                "device='gpu' was requested but CuPy is not installed or no CUDA GPU is visible"
            )
        return _import_cupy()  # type: ignore[return-value]
    raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")


def array_module(*arrays: Any) -> ArrayModule:
    """``cupy`` if any argument is a CuPy array, else ``numpy`` (non-arrays are ignored)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            return _import_cupy()  # type: ignore[return-value]
    return np


def resolve_xp(xp: ArrayModule | None, *arrays: Any) -> ArrayModule:
    """``xp`` if given, otherwise the module inferred from ``arrays``."""
    return xp if xp is not None else array_module(*arrays)


def is_numpy(xp: ArrayModule) -> bool:
    """True for the NumPy (host) backend."""
    return xp is np


def to_host(a: Any) -> np.ndarray:
    """Copy ``a`` to a host NumPy array (no copy when it already is one)."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    if callable(get):
        return get()
    return np.asarray(a)


def device_name(xp: ArrayModule) -> str:
    """ "cpu" for NumPy, "gpu:<device name>" for CuPy (current device)."""
    if is_numpy(xp):
        return "cpu"
    dev_id = xp.cuda.Device().id
    name = xp.cuda.runtime.getDeviceProperties(dev_id)["name"]
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"gpu:{name}"


def device_key(xp: ArrayModule) -> tuple[str, int]:
    """Hashable identity of the backend and current device, for per-device caches."""
    if is_numpy(xp):
        return ("numpy", -1)
    return (xp.__name__, int(xp.cuda.Device().id))
