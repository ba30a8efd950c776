"""A CPU stand-in for CuPy that fails where CuPy fails, for testing the kernels' device path.

``cupy`` and ``cupyx`` below are module objects that the ``fake_cupy`` fixture (tests/conftest.py)
puts into ``sys.modules``, so ``kernels.backend`` finds them exactly as it finds CuPy:
``_import_cupy`` imports "cupy", ``gpu_available``/``get_xp`` see one device,
``array_module`` recognises the arrays by their type's module ("cupy"), ``device_name`` and
``device_key`` read ``cuda.Device().id`` and ``cuda.runtime.getDeviceProperties``.

Arrays are :class:`ndarray`, a wrapper around a NumPy array (not a subclass), with CuPy's rules:

* implicit conversion to NumPy is an error: ``__array__`` raises TypeError, so ``np.asarray``,
  ``np.ascontiguousarray`` and every SciPy function (they all call ``np.asarray``) fail on
  device arrays, as on CuPy. Only ``get()``/``cupy.asnumpy`` (and the scalar conversions
  ``int()``, ``float()``, ``bool()``, ``item()``, ``tolist()``, ``repr()``) copy to the host;
* NumPy functions called on device arrays dispatch through ``__array_function__`` /
  ``__array_ufunc__`` to the function of the same name in this module, as CuPy does: they work
  when CuPy has the function (``np.median(dev)`` returns a device array), and raise TypeError
  otherwise (NumPy's "no implementation found");
* a host ``np.ndarray`` (of any shape, 0-d included) mixed with a device array in an operation,
  a ufunc or a cupy function is a TypeError ("Unsupported type"); Python and NumPy scalars are
  fine. Assigning a non-scalar host array into a device array by basic indexing is CuPy's
  ValueError ("non-scalar numpy.ndarray cannot be used for fill");
* reductions and integer indexing return 0-d device arrays, not scalars; ``cupy.asarray``
  and ``cupy.array`` of host data always copy (an upload), ``cupy.ascontiguousarray`` takes
  device arrays only; ``get(stream, out)`` and ``set(host, stream)`` check dtype, shape and
  contiguity as CuPy does;
* ``cuda.Stream`` (context manager, thread-local current stream), ``cuda.Event``,
  ``cuda.Device``, ``cuda.runtime`` and ``cupyx.empty_pinned`` exist; ``cupyx.scipy`` does not
  (code that reaches for it fails), nor does anything of CuPy not listed in this module.

Every host<->device copy is recorded in :data:`ledger` (direction, how, shape, dtype, the
stream, whether the host side is pinned memory, whether it blocked), with the bytes the
device arrays hold (live and peak). The maths is NumPy's (FFTs: ``scipy.fft``, the host
path's library), so device results can equal host results bit for bit.

What it cannot show: real timings, whether copies and kernels overlap (every operation runs
at once, in order; streams and events are bookkeeping), pinned-memory behaviour, cuFFT's and
CUDA's rounding, CuPy's own dtype rules where they differ from NumPy's, device memory used by
temporaries inside a library call.
"""

from __future__ import annotations

import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft as _sfft

__all__ = ["Transfer", "cupy", "cupyx", "install", "ledger", "ndarray"]

DEVICE_NAME = b"FakeCuPy (NumPy on the CPU)"
DEVICE_MEMORY = 16 << 30


# ----------------------------------------------------------------------------- the ledger
@dataclass(frozen=True)
class Transfer:
    """One host<->device copy."""

    direction: str  # "upload" (host -> device) or "download" (device -> host)
    how: str  # asarray, set, index, get, scalar, ...
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    stream: Any  # the Stream it was issued on
    pinned: bool  # host side lies in cupyx.empty_pinned memory
    blocking: bool  # the host waited for it
    thread: str


class Ledger:
    """Transfers and device memory of the fake (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._roots: dict[int, int] = {}
        self._pinned: dict[int, weakref.ref] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.transfers: list[Transfer] = []
            self.synchronizations = 0
            self.peak_bytes = self.live_bytes

    @property
    def live_bytes(self) -> int:
        return sum(self._roots.values())

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.live_bytes

    def uploads(self, how: str | None = None) -> list[Transfer]:
        return [t for t in self.transfers if t.direction == "upload" and how in (None, t.how)]

    def downloads(self, how: str | None = None) -> list[Transfer]:
        return [t for t in self.transfers if t.direction == "download" and how in (None, t.how)]

    # -- recording
    def record(
        self,
        direction: str,
        how: str,
        host: np.ndarray,
        stream: Any = None,
        *,
        blocking: bool = True,
    ) -> None:
        t = Transfer(
            direction,
            how,
            tuple(host.shape),
            host.dtype,
            int(host.nbytes),
            stream if stream is not None else get_current_stream(),
            self.is_pinned(host),
            blocking,
            threading.current_thread().name,
        )
        with self._lock:
            self.transfers.append(t)

    def track(self, a: np.ndarray) -> None:
        """Count the memory under device array ``a`` (once per underlying buffer)."""
        root = _root(a)
        key = id(root)
        with self._lock:
            if key in self._roots:
                return
            self._roots[key] = int(root.nbytes)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(root, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self._roots.pop(key, None)

    def pin(self, a: np.ndarray) -> None:
        self._pinned[id(a)] = weakref.ref(a)

    def is_pinned(self, a: np.ndarray) -> bool:
        root = _root(a)
        ref = self._pinned.get(id(root))
        return ref is not None and ref() is root


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


ledger = Ledger()


# ----------------------------------------------------------------------------- conversions
_SCALARS = (bool, int, float, complex, np.generic)


def _unsupported(x: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(x)}")


def _dev(x: Any) -> Any:
    """Argument of a device operation: device arrays unwrapped, host arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_dev(v) for v in x)
    return x


def _operand(x: Any) -> Any:
    """Operand of an elementwise operation: a device array or a scalar."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS):
        return x
    raise _unsupported(x)


def _wrap(r: Any) -> Any:
    if isinstance(r, np.ndarray):
        return ndarray._of(r)
    if isinstance(r, np.generic):
        return ndarray._of(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _kw(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: _dev(v) for k, v in kwargs.items()}


def _finish(r: Any, out: Any) -> Any:
    if isinstance(out, ndarray) and r is out._a:
        return out
    return _wrap(r)


def _call(func: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    return _finish(func(*_dev(args), **_kw(kwargs)), kwargs.get("out"))


def _elementwise(ufunc: np.ufunc) -> Any:
    def f(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        if isinstance(out, tuple) and len(out) == 1:
            out = kwargs["out"] = out[0]
        if out is not None and not isinstance(out, ndarray):
            raise TypeError(f"Output arrays must be cupy.ndarray, not {type(out)}")
        r = ufunc(*(_operand(a) for a in args), **_kw(kwargs))
        return _finish(r, out)

    f.__name__ = ufunc.__name__
    for method in ("reduce", "accumulate", "outer", "at", "reduceat"):

        def m(*args: Any, _m: str = method, **kwargs: Any) -> Any:
            return _call(getattr(ufunc, _m), args, kwargs)

        setattr(f, method, m)
    return f


def _function(func: Any, name: str | None = None) -> Any:
    def f(*args: Any, **kwargs: Any) -> Any:
        return _call(func, args, kwargs)

    f.__name__ = name or func.__name__
    return f


def _index(key: Any) -> tuple[Any, bool]:
    """(NumPy index, whether it holds an array) of a device-array subscript; host index arrays
    and lists are copied to the device first, as CuPy does."""
    if isinstance(key, tuple):
        parts = [_index(k) for k in key]
        return tuple(p for p, _ in parts), any(a for _, a in parts)
    if isinstance(key, ndarray):
        return key._a, True
    if isinstance(key, (np.ndarray, list)):
        host = np.asarray(key)
        ledger.record("upload", "index", host)
        return host, True
    return key, False


# ----------------------------------------------------------------------------- ndarray
class ndarray:
    """Device array (see the module docstring)."""

    __module__ = "cupy"  # what kernels.backend.array_module looks at
    __slots__ = ("__weakref__", "_a")
    __array_priority__ = 100.0
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        shape: Any,
        dtype: Any = float,
        memptr: Any = None,
        strides: Any = None,
        order: str = "C",
    ) -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("fake cupy.ndarray: memptr/strides")
        self._a = np.empty(shape, dtype, order=order)
        ledger.track(self._a)

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        if not isinstance(a, np.ndarray):  # NumPy's 0-d results are scalars
            a = np.asarray(a)
        obj = object.__new__(cls)
        obj._a = a
        ledger.track(a)
        return obj

    # -- attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: ndarray._of(self._a.T))
    real = property(lambda self: ndarray._of(self._a.real))
    imag = property(lambda self: ndarray._of(self._a.imag))
    device = property(lambda self: cuda.Device(0))

    @property
    def flags(self) -> Any:
        f = self._a.flags
        return types.SimpleNamespace(
            c_contiguous=f.c_contiguous, f_contiguous=f.f_contiguous, owndata=f.owndata
        )

    # -- transfers
    def get(
        self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
    ) -> np.ndarray:
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained fromcupy.ndarray")
            if self.dtype != out.dtype:
                raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
            if self.shape != out.shape:
                raise ValueError(
                    f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}"
                )
            if not (out.flags.c_contiguous or out.flags.f_contiguous):
                raise RuntimeError(
                    "`out` cannot be specified when copying to non-contiguous ndarray"
                )
            np.copyto(out, self._a)
            host = out
        else:
            host = np.array(self._a, order=order, copy=True)
        ledger.record("download", "get", host, stream, blocking=blocking)
        return host

    def set(self, arr: Any, stream: Any = None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self._a.flags.c_contiguous or self._a.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        self._a[...] = arr
        ledger.record("upload", "set", arr, stream, blocking=False)

    def _scalar(self, how: str) -> np.ndarray:
        host = np.array(self._a, copy=True)
        ledger.record("download", how, host)
        return host

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly."
        )

    def item(self) -> Any:
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self._scalar("item").item()

    def tolist(self) -> Any:
        return self._scalar("tolist").tolist()

    def __int__(self) -> int:
        return int(self._scalar("int"))

    def __float__(self) -> float:
        return float(self._scalar("float"))

    def __complex__(self) -> complex:
        return complex(self._scalar("complex"))

    def __bool__(self) -> bool:
        if self.size == 0:
            warnings.warn(
                "The truth value of an empty array is ambiguous.", DeprecationWarning, stacklevel=2
            )
            return False
        if self.size == 1:
            return bool(self._scalar("bool"))
        raise ValueError(
            "The truth value of an array with more than one element is ambiguous. "
            "Use a.any() or a.all()"
        )

    def __repr__(self) -> str:
        return repr(self._scalar("repr")).replace("array(", "fakecupy.array(", 1)

    def __str__(self) -> str:
        return str(self._scalar("str"))

    def __format__(self, spec: str) -> str:
        return format(self._scalar("format"), spec)

    # -- NumPy protocols, as CuPy implements them
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        func = getattr(cupy, ufunc.__name__, None)
        if func is None:
            return NotImplemented
        if method != "__call__":
            func = getattr(func, method, None)
            if func is None:
                return NotImplemented
        out = kwargs.get("out", ())
        for x in (*inputs, *(out if isinstance(out, tuple) else (out,))):
            if not isinstance(x, (ndarray, np.ndarray, *_SCALARS)):
                return NotImplemented
        return func(*inputs, **kwargs)  # refuses host arrays: TypeError

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        module: Any = cupy
        for part in func.__module__.split(".")[1:]:
            module = getattr(module, part, None)
            if module is None:
                return NotImplemented
        fake = getattr(module, func.__name__, None)
        if fake is None or fake is func:
            return NotImplemented
        if not all(issubclass(t, (ndarray, np.ndarray)) for t in types_):
            return NotImplemented
        return fake(*args, **kwargs)

    # -- container
    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self) -> Any:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __getitem__(self, key: Any) -> ndarray:
        index, _ = _index(key)
        r = self._a[index]
        if isinstance(r, np.generic):  # CuPy returns a 0-d view, not a scalar
            r = self._a[(*(index if isinstance(index, tuple) else (index,)), Ellipsis)]
        return ndarray._of(r)

    def __setitem__(self, key: Any, value: Any) -> None:
        index, advanced = _index(key)
        if isinstance(value, ndarray):
            v = value._a
        elif isinstance(value, _SCALARS):
            v = value
        else:
            host = np.asarray(value)
            if advanced:  # CuPy copies the values to the device for a scatter
                ledger.record("upload", "setitem", host)
                v = host
            elif host.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            else:
                v = host[()]
        self._a[index] = v

    def fill(self, value: Any) -> None:
        self[...] = value

    # -- operators
    def _binary(ufunc: np.ufunc, reflected: bool = False) -> Any:
        def op(self: ndarray, other: Any) -> Any:
            if not isinstance(other, (ndarray, np.ndarray, *_SCALARS)):
                return NotImplemented
            a, b = (other, self) if reflected else (self, other)
            return _wrap(ufunc(_operand(a), _operand(b)))

        return op

    def _inplace(ufunc: np.ufunc) -> Any:
        def op(self: ndarray, other: Any) -> ndarray:
            ufunc(self._a, _operand(other), out=self._a)
            return self

        return op

    def _unary(ufunc: np.ufunc) -> Any:
        return lambda self: ndarray._of(ufunc(self._a))

    __add__, __radd__, __iadd__ = _binary(np.add), _binary(np.add, True), _inplace(np.add)
    __sub__, __rsub__ = _binary(np.subtract), _binary(np.subtract, True)
    __isub__ = _inplace(np.subtract)
    __mul__, __rmul__ = _binary(np.multiply), _binary(np.multiply, True)
    __imul__ = _inplace(np.multiply)
    __truediv__, __rtruediv__ = _binary(np.true_divide), _binary(np.true_divide, True)
    __itruediv__ = _inplace(np.true_divide)
    __floordiv__, __rfloordiv__ = _binary(np.floor_divide), _binary(np.floor_divide, True)
    __ifloordiv__ = _inplace(np.floor_divide)
    __mod__, __rmod__, __imod__ = _binary(np.mod), _binary(np.mod, True), _inplace(np.mod)
    __pow__, __rpow__, __ipow__ = _binary(np.power), _binary(np.power, True), _inplace(np.power)
    __matmul__, __rmatmul__ = _binary(np.matmul), _binary(np.matmul, True)
    __and__, __rand__ = _binary(np.bitwise_and), _binary(np.bitwise_and, True)
    __iand__ = _inplace(np.bitwise_and)
    __or__, __ror__ = _binary(np.bitwise_or), _binary(np.bitwise_or, True)
    __ior__ = _inplace(np.bitwise_or)
    __xor__, __rxor__ = _binary(np.bitwise_xor), _binary(np.bitwise_xor, True)
    __ixor__ = _inplace(np.bitwise_xor)
    __lshift__, __rshift__ = _binary(np.left_shift), _binary(np.right_shift)
    __lt__, __le__ = _binary(np.less), _binary(np.less_equal)
    __gt__, __ge__ = _binary(np.greater), _binary(np.greater_equal)
    __eq__, __ne__ = _binary(np.equal), _binary(np.not_equal)  # type: ignore[assignment]
    __neg__, __pos__ = _unary(np.negative), _unary(np.positive)
    __abs__, __invert__ = _unary(np.absolute), _unary(np.invert)
    del _binary, _inplace, _unary


def _method(name: str) -> Any:
    def m(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        return _finish(getattr(self._a, name)(*_dev(args), **_kw(kwargs)), kwargs.get("out"))

    m.__name__ = name
    return m


# the ndarray methods of CuPy that the fake provides
for _name in (
    "all", "any", "argmax", "argmin", "argsort", "astype", "clip", "conj", "conjugate", "copy",
    "cumprod", "cumsum", "diagonal", "dot", "flatten", "max", "mean", "min", "nonzero",
    "partition", "prod", "ptp", "ravel", "repeat", "reshape", "round", "sort", "squeeze", "std",
    "sum", "swapaxes", "take", "trace", "transpose", "var", "view",
):  # fmt: skip
    setattr(ndarray, _name, _method(_name))


# ----------------------------------------------------------------------------- CUDA
_local = threading.local()


class Stream:
    """Bookkeeping only: work runs at once, in program order."""

    null: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        self.non_blocking = non_blocking
        self.ptr = 0 if null else id(self)
        self.recorded: list[Event] = []

    def _stack(self) -> list[Stream]:
        if not hasattr(_local, "streams"):
            _local.streams = []
        return _local.streams

    def __enter__(self) -> Stream:
        self._stack().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack().pop()

    def use(self) -> Stream:
        stack = self._stack()
        if stack:
            stack[-1] = self
        else:
            stack.append(self)
        return self

    def synchronize(self) -> None:
        with ledger._lock:
            ledger.synchronizations += 1

    def wait_event(self, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"wait_event needs a cupy.cuda.Event, got {type(event)}")

    def record(self, event: Event | None = None) -> Event:
        event = event if event is not None else Event()
        event.record(self)
        return event

    @property
    def done(self) -> bool:
        return True

    def query(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "<fake Stream null>" if self.ptr == 0 else f"<fake Stream {self.ptr:#x}>"


Stream.null = Stream(null=True)


def get_current_stream(device_id: int = -1) -> Stream:
    stack = getattr(_local, "streams", None)
    return stack[-1] if stack else Stream.null


class Event:
    def __init__(
        self, block: bool = False, disable_timing: bool = False, interprocess: bool = False
    ) -> None:
        self.disable_timing = disable_timing
        self.stream: Stream | None = None

    def record(self, stream: Stream | None = None) -> None:
        self.stream = stream if stream is not None else get_current_stream()

    def synchronize(self) -> None:
        with ledger._lock:
            ledger.synchronizations += 1

    @property
    def done(self) -> bool:
        return True

    def query(self) -> bool:
        return True


def get_elapsed_time(start: Event, end: Event) -> float:
    if start.disable_timing or end.disable_timing:
        raise RuntimeError("cudaErrorInvalidResourceHandle: events created without timing")
    return 0.0


class CUDARuntimeError(RuntimeError):
    pass


def _check_device(device: int) -> int:
    if not 0 <= int(device) < 1:
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
    return int(device)


class Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = _check_device(0 if device is None else device)

    compute_capability = "90"

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        with ledger._lock:
            ledger.synchronizations += 1

    @property
    def mem_info(self) -> tuple[int, int]:
        return _runtime.memGetInfo()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _properties(device: int) -> dict[str, Any]:
    _check_device(device)
    return {
        "name": DEVICE_NAME,
        "totalGlobalMem": DEVICE_MEMORY,
        "major": 9,
        "minor": 0,
        "multiProcessorCount": 1,
    }


_runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1,
    getDevice=lambda: 0,
    setDevice=_check_device,
    getDeviceProperties=_properties,
    deviceSynchronize=lambda: Device().synchronize(),
    memGetInfo=lambda: (DEVICE_MEMORY - ledger.live_bytes, DEVICE_MEMORY),
    CUDARuntimeError=CUDARuntimeError,
)

cuda = types.ModuleType("cupy.cuda")
cuda.__dict__.update(
    Stream=Stream,
    Event=Event,
    Device=Device,
    runtime=_runtime,
    get_current_stream=get_current_stream,
    get_elapsed_time=get_elapsed_time,
    is_available=lambda: True,
    CUDARuntimeError=CUDARuntimeError,
)


# ----------------------------------------------------------------------------- creation
def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> Any:
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return array(a, dtype=dtype, copy=True, order=order or "K", blocking=blocking)


def _holds_device(a: Any) -> bool:
    if isinstance(a, ndarray):
        return True
    return isinstance(a, (list, tuple)) and any(_holds_device(v) for v in a)


def array(
    obj: Any,
    dtype: Any = None,
    copy: bool = True,
    order: str = "K",
    subok: bool = False,
    ndmin: int = 0,
    *,
    blocking: bool = False,
) -> ndarray:
    if isinstance(obj, ndarray):
        r = np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin)
        return ndarray._of(r)
    if _holds_device(obj):  # a sequence of device arrays: stacked on the device
        return ndarray._of(np.array(_dev(obj), dtype=dtype, order=order, ndmin=ndmin))
    host = np.array(obj, dtype=dtype, order=order, ndmin=ndmin, copy=True)
    if host.dtype == object:
        raise ValueError("Unsupported dtype object")
    ledger.record("upload", "asarray", host, blocking=blocking)
    return ndarray._of(host)


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):  # cupy._core.ascontiguousarray(_ndarray_base a, ...)
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got {type(a)})")
    return ndarray._of(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(
    a: Any, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return np.asarray(a, order=order)


def get_array_module(*args: Any) -> Any:
    return cupy if any(isinstance(a, ndarray) for a in args) else np


def copyto(dst: Any, src: Any, casting: str = "same_kind", where: Any = None) -> None:
    if not isinstance(dst, ndarray):
        raise TypeError(f"Unsupported type {type(dst)}")
    np.copyto(
        dst._a, _operand(src), casting=casting, where=True if where is None else _operand(where)
    )


def _creation(func: Any) -> Any:
    def f(*args: Any, **kwargs: Any) -> ndarray:
        kwargs.pop("like", None)
        return ndarray._of(np.asarray(func(*_dev(args), **_kw(kwargs))))

    f.__name__ = func.__name__
    return f


# ----------------------------------------------------------------------------- fft
def _fft(func: Any) -> Any:
    def f(a: Any, n: Any = None, axis: int = -1, norm: Any = None) -> ndarray:
        if not isinstance(a, ndarray):
            raise TypeError(f"The input array a must be a cupy.ndarray, got {type(a)}")
        return ndarray._of(func(a._a, n=n, axis=axis, norm=norm))

    f.__name__ = func.__name__
    return f


def _fftn(func: Any) -> Any:
    def f(a: Any, s: Any = None, axes: Any = None, norm: Any = None) -> ndarray:
        if not isinstance(a, ndarray):
            raise TypeError(f"The input array a must be a cupy.ndarray, got {type(a)}")
        return ndarray._of(func(a._a, s=s, axes=axes, norm=norm))

    f.__name__ = func.__name__
    return f


fft = types.ModuleType("cupy.fft")
for _name in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft"):
    setattr(fft, _name, _fft(getattr(_sfft, _name)))
for _name in ("fft2", "ifft2", "fftn", "ifftn", "rfft2", "irfft2", "rfftn", "irfftn"):
    setattr(fft, _name, _fftn(getattr(_sfft, _name)))
for _name in ("fftfreq", "rfftfreq"):
    setattr(fft, _name, _creation(getattr(np.fft, _name)))
for _name in ("fftshift", "ifftshift"):
    setattr(fft, _name, _function(getattr(np.fft, _name)))


# ----------------------------------------------------------------------------- the modules
cupy = types.ModuleType("cupy")
cupy.__doc__ = "Fake CuPy (tests/fakecupy.py): NumPy underneath, CuPy's refusals on top."
cupy.__dict__.update(
    ndarray=ndarray,
    cuda=cuda,
    fft=fft,
    asarray=asarray,
    array=array,
    ascontiguousarray=ascontiguousarray,
    asnumpy=asnumpy,
    get_array_module=get_array_module,
    copyto=copyto,
    ledger=ledger,
    inf=np.inf,
    nan=np.nan,
    pi=np.pi,
    e=np.e,
    newaxis=None,
    dtype=np.dtype,
    iinfo=np.iinfo,
    finfo=np.finfo,
    result_type=lambda *a: np.result_type(*(x.dtype if isinstance(x, ndarray) else x for x in a)),
    can_cast=np.can_cast,
    isscalar=np.isscalar,
    get_default_memory_pool=lambda: types.SimpleNamespace(
        used_bytes=lambda: ledger.live_bytes,
        total_bytes=lambda: ledger.live_bytes,
        free_all_blocks=lambda: None,
    ),
)
for _name in (
    "bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "intp",
    "uintp", "float16", "float32", "float64", "complex64", "complex128", "byte", "short", "intc",
    "longlong", "ubyte", "ushort", "uintc", "ulonglong", "half", "single", "double", "csingle",
    "cdouble", "number", "integer", "signedinteger", "unsignedinteger", "floating",
    "complexfloating", "generic",
):  # fmt: skip
    setattr(cupy, _name, getattr(np, _name))
cupy.bool = np.bool_
for _name in (  # ufuncs of CuPy (elementwise: operands are device arrays or scalars)
    "abs", "absolute", "add", "angle", "arccos", "arccosh", "arcsin", "arcsinh", "arctan",
    "arctan2", "arctanh", "bitwise_and", "bitwise_not", "bitwise_or", "bitwise_xor", "cbrt",
    "ceil", "conj", "conjugate", "copysign", "cos", "cosh", "deg2rad", "degrees", "divide",
    "equal", "exp", "exp2", "expm1", "fabs", "floor", "floor_divide", "fmax", "fmin", "fmod",
    "greater", "greater_equal", "hypot", "invert", "isfinite", "isinf", "isnan", "ldexp",
    "left_shift", "less", "less_equal", "log", "log10", "log1p", "log2", "logaddexp",
    "logical_and", "logical_not", "logical_or", "logical_xor", "maximum", "minimum", "mod",
    "multiply", "negative", "nextafter", "not_equal", "positive", "power", "rad2deg",
    "radians", "reciprocal", "remainder", "right_shift", "rint", "sign", "signbit", "sin",
    "sinh", "sqrt", "square", "subtract", "tan", "tanh", "true_divide", "trunc",
):  # fmt: skip
    setattr(cupy, _name, _elementwise(getattr(np, _name)))
for _name in (  # functions of CuPy taking device arrays
    "all", "allclose", "amax", "amin", "any", "argmax", "argmin", "argsort", "argwhere",
    "around", "array_equal", "atleast_1d", "atleast_2d", "atleast_3d", "average",
    "broadcast_arrays", "broadcast_to", "clip", "column_stack", "concatenate", "count_nonzero",
    "cumprod", "cumsum", "diag", "diagonal", "diff", "dot", "dstack", "einsum", "empty_like",
    "expand_dims", "flatnonzero", "flip", "fliplr", "flipud", "full_like", "hstack", "imag",
    "isclose", "matmul", "max", "mean", "median", "min", "moveaxis", "nan_to_num", "nanargmax",
    "nanargmin", "nanmax", "nanmean", "nanmedian", "nanmin", "nanstd", "nansum", "nanvar",
    "nonzero", "ones_like", "pad", "partition", "percentile", "prod", "ptp", "put_along_axis",
    "quantile", "ravel", "real", "repeat", "reshape", "roll", "rollaxis", "round", "searchsorted",
    "sort", "split", "array_split", "squeeze", "stack", "std", "sum", "swapaxes", "take",
    "take_along_axis", "tile", "transpose", "unique", "var", "vstack", "where", "zeros_like",
):  # fmt: skip
    setattr(cupy, _name, _function(getattr(np, _name)))
for _name in (
    "empty",
    "zeros",
    "ones",
    "full",
    "arange",
    "linspace",
    "logspace",
    "eye",
    "identity",
    "indices",
    "tri",
):
    setattr(cupy, _name, _creation(getattr(np, _name)))

cupyx = types.ModuleType("cupyx")
cupyx.__doc__ = "Fake cupyx: pinned host memory only (no cupyx.scipy)."


def empty_pinned(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    a = np.empty(shape, dtype, order=order)
    ledger.pin(a)
    return a


def zeros_pinned(shape: Any, dtype: Any = float, order: str = "C") -> np.ndarray:
    a = empty_pinned(shape, dtype, order)
    a[...] = 0
    return a


cupyx.empty_pinned = empty_pinned
cupyx.zeros_pinned = zeros_pinned


# ----------------------------------------------------------------------------- installing
def install(monkeypatch: Any) -> types.ModuleType:
    """Make ``import cupy`` / ``import cupyx`` give the fakes for one test (``monkeypatch``
    undoes it): ``kernels.backend`` then sees one CUDA device. The resampling-table cache
    (keyed by the device's ``("cupy", 0)``) is emptied, so no fake array reaches a real CuPy
    in the same session, and the ledger is cleared."""
    from collections import OrderedDict

    from kernels import resampling

    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(resampling, "_CACHE", OrderedDict())
    ledger.reset()
    return cupy
