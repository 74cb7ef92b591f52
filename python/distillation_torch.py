"""PyTorch bindings for the `distillation` CUDA kernels through its C ABI (ctypes, no build step).

Build the library once (`cargo build --release`; it produces `target/release/libdistillation.so`),
then::

    import distillation_torch as dt
    loss = dt.kd_loss(student_logits, teacher_logits, labels, T=4.0, alpha=0.2)
    loss.backward()          # student_logits.grad = the fused kernel's gradient

The library is found through ``DISTILLATION_LIB`` (a path to the .so), else next to this file's
repository in ``target/release`` then ``target/debug``; or call :func:`load` with a path.

Stream ordering: each call launches its kernels on PyTorch's current stream of the tensors' device
(a crate context is made per device and stream with ``dst_cuda_create_on_stream``), so they are
ordered with PyTorch's own work like any PyTorch op and nothing waits. ``sync=True`` additionally
blocks until the kernels have finished (for timing or debugging).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

__all__ = [
    "load",
    "version",
    "DistillationError",
    "kd_loss",
    "kl_div",
    "cross_entropy",
    "mse",
    "stream_handle",
]

_REDUCTIONS = {"batchmean": 0, "sum": 1}
_DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_TEACHER_INPUTS = {"logits": 0, "probs": 1, "logprobs": 2}

_F = ctypes.POINTER(ctypes.c_float)
_I = ctypes.POINTER(ctypes.c_int32)
_P = ctypes.c_void_p
_SZ = ctypes.c_size_t
_f32 = ctypes.c_float
_i32 = ctypes.c_int32

_lib = None
_lock = threading.Lock()
_contexts: dict[int, ctypes.c_void_p] = {}


class DistillationError(RuntimeError):
    """A non-zero status of the C ABI, with the library's message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"distillation error {status}: {message}")
        self.status = status


def _candidates():
    env = os.environ.get("DISTILLATION_LIB")
    if env:
        yield Path(env)
    root = Path(__file__).resolve().parent.parent
    for profile in ("release", "debug"):
        yield root / "target" / profile / "libdistillation.so"


def load(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Loads the cdylib (once) and declares the entry points of ``include/distillation.h``."""
    global _lib
    with _lock:
        if _lib is not None and path is None:
            return _lib
        paths = [Path(path)] if path is not None else list(_candidates())
        found = next((p for p in paths if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                "libdistillation.so not found (tried "
                + ", ".join(map(str, paths))
                + "): run `cargo build --release` or set DISTILLATION_LIB"
            )
        lib = ctypes.CDLL(str(found))
        lib.dst_version.restype = ctypes.c_uint32
        lib.dst_version.argtypes = []
        lib.dst_version_string.restype = ctypes.c_char_p
        lib.dst_version_string.argtypes = []
        lib.dst_last_error.restype = ctypes.c_char_p
        lib.dst_last_error.argtypes = []
        lib.dst_cuda_create.restype = _i32
        lib.dst_cuda_create.argtypes = [_i32, ctypes.POINTER(_P)]
        lib.dst_cuda_create_on_stream.restype = _i32
        lib.dst_cuda_create_on_stream.argtypes = [_i32, _P, ctypes.POINTER(_P)]
        lib.dst_cuda_destroy.restype = _i32
        lib.dst_cuda_destroy.argtypes = [_P]
        lib.dst_cuda_synchronize.restype = _i32
        lib.dst_cuda_synchronize.argtypes = [_P]
        lib.dst_cuda_stream.restype = _i32
        lib.dst_cuda_stream.argtypes = [_P, ctypes.POINTER(_P), _I]
        lib.dst_cuda_hinton.restype = _i32
        lib.dst_cuda_hinton.argtypes = [_P, _P, _P, _P, _SZ, _SZ, _f32, _f32, _f32, _i32, _i32,
                                        _f32, _P, _P, _P, _P]
        lib.dst_cuda_divergence.restype = _i32
        lib.dst_cuda_divergence.argtypes = [_P, _P, _P, _P, _SZ, _SZ, _i32, _f32, _f32, _i32,
                                            _f32, _i32, _i32, _f32, _P, _P, _P, _P]
        lib.dst_cuda_cross_entropy.restype = _i32
        lib.dst_cuda_cross_entropy.argtypes = [_P, _P, _P, _SZ, _SZ, _f32, _i32, _i32, _f32, _P,
                                               _P, _P]
        lib.dst_cuda_mse.restype = _i32
        lib.dst_cuda_mse.argtypes = [_P, _P, _P, _SZ, _f32, _P, _P, _P]
        _lib = lib
        return lib


def _check(status: int) -> None:
    if status != 0:
        message = _lib.dst_last_error().decode("utf-8", "replace")
        raise DistillationError(status, message)


def version() -> tuple[int, str]:
    """(ABI version, crate version), e.g. ``(2, "0.1.0")``."""
    lib = load()
    return int(lib.dst_version()), lib.dst_version_string().decode()


def _context(device: int) -> ctypes.c_void_p:
    """The crate's context bound to PyTorch's current stream on ``device`` (one per stream)."""
    lib = load()
    stream = torch.cuda.current_stream(device).cuda_stream
    with _lock:
        ctx = _contexts.get((device, stream))
        if ctx is None:
            ctx = _P()
            _check(lib.dst_cuda_create_on_stream(device, _P(stream), ctypes.byref(ctx)))
            _contexts[(device, stream)] = ctx
        return ctx


def stream_handle(device: int = 0) -> int:
    """The ``CUstream`` the crate launches on for ``device`` (PyTorch's current stream there)."""
    stream = _P()
    _check(load().dst_cuda_stream(_context(device), ctypes.byref(stream), None))
    return int(stream.value or 0)


def _prep(x: torch.Tensor, name: str, dtype=torch.float32) -> torch.Tensor:
    if not x.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor (got device {x.device})")
    return x.detach().to(dtype).contiguous()


def _ptr(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def _rows(x: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"expected [N, C] logits, got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def _run(device: int, sync: bool, call) -> None:
    """Launches on PyTorch's current stream; with ``sync``, waits for the kernels too."""
    ctx = _context(device)
    _check(call(ctx))
    if sync:
        _check(_lib.dst_cuda_synchronize(ctx))


class _RowLoss(torch.autograd.Function):
    """Forward computes the loss and the student's gradient in one kernel and stores the gradient;
    backward returns ``grad_output * gradient``."""

    @staticmethod
    def forward(ctx_, student, launch, sync):
        loss = torch.zeros(1, device=student.device, dtype=torch.float32)
        grad = torch.empty(student.shape, device=student.device, dtype=torch.float32)
        launch(loss, grad, sync)
        ctx_.save_for_backward(grad)
        return loss[0].to(student.dtype)

    @staticmethod
    def backward(ctx_, grad_output):
        (grad,) = ctx_.saved_tensors
        return (grad_output.to(grad.dtype) * grad).to(grad_output.dtype), None, None


def kd_loss(student, teacher, labels, T: float = 4.0, alpha: float = 0.2, *,
            label_smoothing: float = 0.0, ignore_index: int = -100,
            reduction: str = "batchmean", sync: bool = False) -> torch.Tensor:
    """The fused Hinton loss ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(q_T || p_T)``
    on CUDA tensors (``[N, C]`` logits, ``[N]`` labels); differentiable in ``student``.
    ``reduction``: ``"batchmean"`` (over rows whose label is not ``ignore_index``) or ``"sum"``."""
    s = _prep(student, "student")
    t = _prep(teacher, "teacher")
    y = _prep(labels, "labels", torch.int32)
    n, c = _rows(s)
    device = s.device.index if s.device.index is not None else torch.cuda.current_device()
    red = _REDUCTIONS[reduction]

    def launch(loss, grad, sync_):
        _run(device, sync_, lambda ctx: _lib.dst_cuda_hinton(
            ctx, _ptr(s), _ptr(t), _ptr(y), n, c, T, alpha, label_smoothing, ignore_index, red,
            1.0, _ptr(loss), None, _ptr(grad), None))

    return _RowLoss.apply(student, launch, sync)


def kl_div(student, teacher, T: float = 1.0, *, divergence: str = "forward_kl", beta: float = 0.5,
           teacher_input: str = "logits", teacher_eps: float = 0.0, labels=None,
           ignore_index: int = -100, reduction: str = "batchmean",
           sync: bool = False) -> torch.Tensor:
    """A soft-target divergence (``forward_kl`` = ``KL(q || p)``, ``reverse_kl``, ``jsd``) between
    student logits and a teacher given as ``logits``, ``probs`` or ``logprobs``, at temperature
    ``T`` (not multiplied by ``T^2``); rows whose label is ``ignore_index`` are masked when
    ``labels`` is given. ``teacher_eps`` (``reverse_kl`` with ``probs`` / ``logprobs`` only; 0 is
    none) floors the teacher inside the log, ``log max(q, teacher_eps)``: without it a teacher
    probability of exactly 0 makes the row's loss ``inf`` on the device. Differentiable in
    ``student``."""
    s = _prep(student, "student")
    t = _prep(teacher, "teacher")
    y = None if labels is None else _prep(labels, "labels", torch.int32)
    n, c = _rows(s)
    device = s.device.index if s.device.index is not None else torch.cuda.current_device()
    div, tin, red = _DIVERGENCES[divergence], _TEACHER_INPUTS[teacher_input], _REDUCTIONS[reduction]

    def launch(loss, grad, sync_):
        _run(device, sync_, lambda ctx: _lib.dst_cuda_divergence(
            ctx, _ptr(s), _ptr(t), _ptr(y), n, c, div, beta, teacher_eps, tin, T, ignore_index,
            red, 1.0, _ptr(loss), None, _ptr(grad), None))

    return _RowLoss.apply(student, launch, sync)


def cross_entropy(student, labels, *, label_smoothing: float = 0.0, ignore_index: int = -100,
                  reduction: str = "batchmean", sync: bool = False) -> torch.Tensor:
    """Cross-entropy with hard labels (``"batchmean"`` is PyTorch's ``"mean"``: over rows whose
    label is not ``ignore_index``). Differentiable in ``student``."""
    s = _prep(student, "student")
    y = _prep(labels, "labels", torch.int32)
    n, c = _rows(s)
    device = s.device.index if s.device.index is not None else torch.cuda.current_device()
    red = _REDUCTIONS[reduction]

    def launch(loss, grad, sync_):
        _run(device, sync_, lambda ctx: _lib.dst_cuda_cross_entropy(
            ctx, _ptr(s), _ptr(y), n, c, label_smoothing, ignore_index, red, 1.0, _ptr(loss),
            None, _ptr(grad)))

    return _RowLoss.apply(student, launch, sync)


def mse(a, b, *, sync: bool = False) -> torch.Tensor:
    """Feature MSE ``mean((a - b)^2)``; differentiable in ``a`` (``b`` is a target)."""
    x = _prep(a, "a")
    z = _prep(b, "b")
    if x.shape != z.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(z.shape)}")
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()

    def launch(loss, grad, sync_):
        _run(device, sync_, lambda ctx: _lib.dst_cuda_mse(
            ctx, _ptr(x), _ptr(z), x.numel(), 1.0, _ptr(loss), _ptr(grad), None))

    return _RowLoss.apply(a, launch, sync)
