"""The crate's C ABI (``include/distillation.h``) through ctypes: loading the shared library that
``pip install`` placed next to this file, the entry points' signatures, errors, and the CUDA
contexts bound to PyTorch's streams."""

from __future__ import annotations

import ctypes
import glob
import os
import threading

ABI_VERSION = 10

_F = ctypes.POINTER(ctypes.c_float)
_I = ctypes.POINTER(ctypes.c_int32)
_P = ctypes.c_void_p
_SZ = ctypes.c_size_t
_f32 = ctypes.c_float
_i32 = ctypes.c_int32

_lib = None
_lock = threading.Lock()
_contexts: dict = {}


class FusedLinearSpec(ctypes.Structure):
    """``DstFusedLinearSpec`` of the header (``dst_*_fused_linear_kd``): the scalars of the fused
    linear layer + distillation loss, field for field."""

    _fields_ = [
        ("n", _SZ), ("hidden", _SZ), ("vocab", _SZ), ("teacher_hidden", _SZ),
        ("teacher_vocab", _SZ), ("temperature", _f32), ("divergence", _i32), ("beta", _f32),
        ("weighting", _i32), ("alpha", _f32), ("weight_hard", _f32), ("weight_soft", _f32),
        ("label_smoothing", _f32), ("ignore_index", _i32), ("reduction", _i32),
        ("grad_scale", _f32), ("memory_budget", _SZ), ("chunk_rows", _SZ),
    ]


class DistillationError(ValueError):
    """A call the library rejected: ``status`` is the C ABI's ``DST_ERR_*`` code, the message is
    the library's (what is wrong and how to fix it). A ``ValueError``, so code that catches
    PyTorch's argument errors catches it too."""

    STATUS_NAMES = {
        1: "null pointer", 2: "invalid argument", 3: "shape", 4: "label", 5: "alias",
        6: "unavailable", 7: "device", 8: "internal error", 9: "unsupported", 10: "limit",
        11: "input", 12: "I/O", 13: "configuration",
    }

    def __init__(self, status: int, message: str):
        name = self.STATUS_NAMES.get(status, "error")
        super().__init__(f"distillation ({name}, status {status}): {message}")
        self.status = status


def _library_path() -> str:
    """The shared library inside the installed package; ``DISTILLATION_LIB`` overrides it (to
    test a library built elsewhere, e.g. ``target/release/libdistillation.so``)."""
    env = os.environ.get("DISTILLATION_LIB")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_native*")))
    found = [f for f in found if f.endswith((".so", ".dylib", ".dll", ".pyd"))]
    if not found:
        raise ImportError(
            f"the distillation shared library is missing from {here}: install the package with "
            "`pip install ./python` from the repository (it builds the Rust library with cargo)"
        )
    return found[0]


def _declare(lib) -> None:
    def sig(name, *args):
        f = getattr(lib, name)
        f.restype = _i32
        f.argtypes = list(args)

    lib.dst_version.restype = ctypes.c_uint32
    lib.dst_version.argtypes = []
    lib.dst_version_string.restype = ctypes.c_char_p
    lib.dst_version_string.argtypes = []
    lib.dst_last_error.restype = ctypes.c_char_p
    lib.dst_last_error.argtypes = []
    # Host memory, the fast CPU backend (threads first). Each student, teacher and gradient
    # pointer of the row losses is followed by its dtype code (DTYPES).
    sig("dst_fast_hinton", _i32, _P, _i32, _P, _i32, _P, _SZ, _SZ, _f32, _f32, _f32, _i32, _i32,
        _f32, _P, _P, _P, _i32, _P, _i32)
    sig("dst_fast_divergence", _i32, _P, _i32, _P, _i32, _P, _SZ, _SZ, _i32, _f32, _f32, _i32,
        _f32, _i32, _i32, _f32, _P, _P, _P, _i32, _P, _i32)
    sig("dst_fast_cross_entropy", _i32, _P, _i32, _P, _SZ, _SZ, _f32, _i32, _i32, _f32, _P, _P,
        _P, _i32)
    sig("dst_fast_mse", _i32, _P, _P, _SZ, _f32, _P, _P, _P)
    sig("dst_fast_dkd", _i32, _P, _i32, _P, _i32, _P, _SZ, _SZ, _f32, _f32, _f32, _f32, _f32,
        _i32, _i32, _f32, _P, _P, _P, _i32)
    # (student, dtype, indices, values, dtype, labels, n, c, k, divergence, beta, values kind,
    # tail, T, alpha, label smoothing, ignore_index, reduction, grad_scale, loss, rows, grad,
    # dtype)
    sparse = (_P, _i32, _P, _P, _i32, _P, _SZ, _SZ, _SZ, _i32, _f32, _i32, _i32, _f32, _f32, _f32,
              _i32, _i32, _f32, _P, _P, _P, _i32)
    sig("dst_fast_sparse_kd", _i32, *sparse)
    # Device memory, the CUDA backend (a context first).
    sig("dst_cuda_create_on_stream", _i32, _P, ctypes.POINTER(_P))
    sig("dst_cuda_destroy", _P)
    sig("dst_cuda_synchronize", _P)
    sig("dst_cuda_hinton", _P, _P, _i32, _P, _i32, _P, _SZ, _SZ, _f32, _f32, _f32, _i32, _i32,
        _f32, _P, _P, _P, _i32, _P, _i32)
    sig("dst_cuda_divergence", _P, _P, _i32, _P, _i32, _P, _SZ, _SZ, _i32, _f32, _f32, _i32,
        _f32, _i32, _i32, _f32, _P, _P, _P, _i32, _P, _i32)
    sig("dst_cuda_cross_entropy", _P, _P, _i32, _P, _SZ, _SZ, _f32, _i32, _i32, _f32, _P, _P,
        _P, _i32)
    sig("dst_cuda_mse", _P, _P, _P, _SZ, _f32, _P, _P, _P)
    sig("dst_cuda_dkd", _P, _P, _i32, _P, _i32, _P, _SZ, _SZ, _f32, _f32, _f32, _f32, _f32,
        _i32, _i32, _f32, _P, _P, _P, _i32)
    sig("dst_cuda_sparse_kd", _P, *sparse)
    # The fused linear layer + loss: the spec, then (pointer, dtype) for hidden, weight, bias,
    # teacher hidden, teacher weight, teacher bias, teacher logits; labels, loss; (pointer,
    # dtype) for grad_hidden, grad_weight, grad_bias.
    fused = (ctypes.POINTER(FusedLinearSpec),) + (_P, _i32) * 7 + (_P, _P) + (_P, _i32) * 3
    sig("dst_fast_fused_linear_kd", _i32, *fused)
    sig("dst_cuda_fused_linear_kd", _P, *fused)
    # With a sparse top-k teacher: the spec, (pointer, dtype) for hidden, weight, bias; k,
    # indices, values, values dtype, values kind, tail; labels, loss; (pointer, dtype) for the
    # three gradients.
    fused_sparse = ((ctypes.POINTER(FusedLinearSpec),) + (_P, _i32) * 3
                    + (_SZ, _P, _P, _i32, _i32, _i32) + (_P, _P) + (_P, _i32) * 3)
    sig("dst_fast_fused_linear_sparse_kd", _i32, *fused_sparse)
    sig("dst_cuda_fused_linear_sparse_kd", _P, *fused_sparse)

def lib():
    """The loaded library (loaded and checked once)."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            path = _library_path()
            handle = ctypes.CDLL(path)
            handle.dst_version.restype = ctypes.c_uint32
            got = int(handle.dst_version())
            if got != ABI_VERSION:
                raise ImportError(
                    f"{path} has C ABI version {got}, this package needs {ABI_VERSION}: "
                    "reinstall the package (`pip install ./python`)"
                )
            _declare(handle)
            _lib = handle
    return _lib


def check(status: int) -> None:
    """Raises the library's error for a non-zero status."""
    if status != 0:
        message = lib().dst_last_error().decode("utf-8", "replace")
        raise DistillationError(status, message)


def version() -> tuple[int, str]:
    """(C ABI version, crate version), e.g. ``(5, "0.1.0")``."""
    h = lib()
    return int(h.dst_version()), h.dst_version_string().decode()


def cuda_context(device: int, stream: int):
    """The crate's CUDA context on ``device`` bound to the CUDA stream ``stream`` (one per
    device and stream, kept for the process)."""
    h = lib()
    key = (device, stream)
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _P()
            status = h.dst_cuda_create_on_stream(device, _P(stream), ctypes.byref(ctx))
            if status != 0:
                message = h.dst_last_error().decode("utf-8", "replace")
                raise DistillationError(status, message)
            _contexts[key] = ctx
        return ctx
