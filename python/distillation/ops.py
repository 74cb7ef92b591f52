"""The losses as PyTorch custom ops (``torch.library.custom_op``, with ``register_fake`` and
``register_autograd``): ``torch.compile`` traces through them without a graph break, and
``loss.backward()`` fills the student's (and, for online distillation, the teacher's) gradient,
scaled by the upstream gradient.

Each op's forward runs the crate's fused kernel once: it computes the loss and the gradient
together (``docs/LOSSES.md``), keeps the gradient, and the backward multiplies it by the upstream
gradient. CPU tensors run on the fast CPU backend (``dst_fast_*``, ``torch.get_num_threads()``
threads, no copies of contiguous float32 inputs), CUDA tensors on the CUDA backend on PyTorch's
current stream (``dst_cuda_*``). The logits of the row losses may be float32, bfloat16 or
float16 (student and teacher independently): the kernels read them as they are, compute in
float32, return the loss in float32 and each gradient in its input's dtype, rounded once
(``docs/LOSSES.md``, half precision). float64 inputs are computed in float32 (the loss returns
in float64); non-contiguous tensors are copied.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from . import _lib

_KL_REDUCTIONS = ("batchmean", "sum", "none")
_CE_REDUCTIONS = ("mean", "batchmean", "sum", "none")
DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
TEACHER_INPUTS = {"logits": 0, "probs": 1, "logprobs": 2}
SPARSE_VALUES = {"logprobs": 0, "logits": 1}
SPARSE_TAILS = {"renormalize": 0, "bucket": 1, "uniform": 2}
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
# Label and index dtypes whose values convert to int64 exactly (uint16 / uint32 / uint64 are not
# accepted: uint64 past 2^63 would wrap).
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _ptr(t: Optional[Tensor]):
    return None if t is None or t.numel() == 0 else ctypes.c_void_p(t.data_ptr())


# The C ABI's dtype codes (DST_F32, DST_BF16, DST_F16).
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _dt(t: Optional[Tensor]) -> int:
    """The dtype code of a row loss's array (an absent one: DST_F32)."""
    return 0 if t is None or t.numel() == 0 else _DTYPES[t.dtype]


def _f32_zeros(like: Tensor, *shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


def _f32_empty(like: Tensor, *shape: int) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


def _op_error(op: str, what: str, why: str) -> ValueError:
    return ValueError(f"distillation::{op}: {what} {why} (the wrapper functions, kd_loss, "
                      "fused_linear_kd_loss, ..., check and convert their inputs)")


def _op_lead(op: str, name: str, x) -> tuple[int, int]:
    """The leading array of a custom op called directly (``torch.ops.distillation.*``): a 2-D
    CPU or CUDA tensor, whose shape the call's sizes come from. Returns that shape."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise _op_error(op, name, "must be a 2-D tensor")
    if x.device.type not in ("cpu", "cuda"):
        raise _op_error(op, name, f"is on {x.device}: only CPU and CUDA tensors are supported")
    return tuple(x.shape)


def _op_arrays(op: str, device: torch.device, floats=(), int32s=(), ints=()) -> None:
    """The checks of a custom op called directly (the wrappers call it with checked arguments):
    every array ``(name, tensor or None, shape)`` the C call reads or writes has that shape
    (``-1``: any size), a dtype it reads (``floats``: float32 / bfloat16 / float16; ``int32s``:
    int32), is contiguous and on ``device``; every int of ``ints`` fits the C ABI's int32 (ctypes
    would truncate it)."""
    for kinds, arrays in ((tuple(_DTYPES), floats), ((torch.int32,), int32s)):
        for what, t, shape in arrays:
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.dtype not in kinds:
                raise _op_error(op, what, f"must be a tensor of {', '.join(map(str, kinds))}, "
                                f"got {getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != len(shape) or any(s not in (-1, d) for s, d in zip(shape, t.shape)):
                raise _op_error(op, what, f"has shape {tuple(t.shape)}, expected {tuple(shape)}")
            if not t.is_contiguous() or t.device != device:
                raise _op_error(op, what, f"must be contiguous and on {device}")
    for name, x in ints:
        if not _I32_MIN <= int(x) <= _I32_MAX:
            raise _op_error(op, name, f"= {x} does not fit in int32")


def _op_rows(op: str, student: Tensor, *, teacher: Optional[Tensor] = None,
             labels: Optional[Tensor] = None, ints: tuple = ()) -> tuple[int, int]:
    """:func:`_op_arrays` for a row loss: ``[N, C]`` student and teacher, ``[N]`` labels.
    Returns ``(N, C)``."""
    n, c = _op_lead(op, "student", student)
    _op_arrays(op, student.device, floats=(("student", student, (n, c)),
                                           ("teacher", teacher, (n, c))),
               int32s=(("labels", labels, (n,)),), ints=ints)
    return n, c


def _launch(kind: str, device: torch.device, *args) -> None:
    """Calls ``dst_fast_<kind>`` (CPU) or ``dst_cuda_<kind>`` (CUDA) with ``args``."""
    h = _lib.lib()
    if device.type == "cpu":
        status = getattr(h, f"dst_fast_{kind}")(torch.get_num_threads(), *args)
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(index).cuda_stream
        status = getattr(h, f"dst_cuda_{kind}")(_lib.cuda_context(index, stream), *args)
    else:
        raise ValueError(f"tensors on {device} are not supported: use CPU or CUDA tensors")
    _lib.check(status)


def _grad_buffer(like: Tensor, wanted: bool) -> Tensor:
    return torch.empty_like(like) if wanted else like.new_empty(0)


# ---- the fused Hinton loss ----

@torch.library.custom_op("distillation::hinton", mutates_args=())
def hinton_op(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float, alpha: float,
              label_smoothing: float, ignore_index: int, reduction: int, rows: bool,
              want_student: bool, want_teacher: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``[N, C]`` float32 / bfloat16 / float16 logits, ``[N]`` int32 labels; ``reduction`` 0 batchmean or 1 sum;
    ``rows``: return the ``[N]`` row losses (with the sum's gradient). Returns (loss,
    grad_student or empty, grad_teacher or empty)."""
    n, c = _op_rows("hinton", student, teacher=teacher, labels=labels,
                    ints=(("ignore_index", ignore_index), ("reduction", reduction)))
    loss = _f32_zeros(student)
    row = _f32_zeros(student, n) if rows else None
    gs, gt = _grad_buffer(student, want_student), _grad_buffer(teacher, want_teacher)
    _launch("hinton", student.device, _ptr(student), _dt(student), _ptr(teacher), _dt(teacher),
            _ptr(labels), n, c, temperature, alpha, label_smoothing, ignore_index, reduction, 1.0,
            _ptr(loss), _ptr(row), _ptr(gs), _dt(gs), _ptr(gt), _dt(gt))
    return (row if rows else loss), gs, gt


@hinton_op.register_fake
def _(student, teacher, labels, temperature, alpha, label_smoothing, ignore_index, reduction,
      rows, want_student, want_teacher):
    n = student.shape[0]
    return (_f32_empty(student, *((n,) if rows else ())),
            _grad_buffer(student, want_student), _grad_buffer(teacher, want_teacher))


# ---- the soft-target divergences ----

@torch.library.custom_op("distillation::divergence", mutates_args=())
def divergence_op(student: Tensor, teacher: Tensor, labels: Optional[Tensor], divergence: int,
                  beta: float, teacher_eps: float, teacher_input: int, temperature: float,
                  ignore_index: int, reduction: int, rows: bool, want_student: bool,
                  want_teacher: bool) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`hinton_op`, for ``T^2 * D(q || p)`` with D forward KL (0), reverse KL (1) or
    JSD(beta) (2) and the teacher given as logits (0), probabilities (1) or log-probabilities
    (2); ``labels`` optional (masks rows whose label is ``ignore_index``)."""
    n, c = _op_rows("divergence", student, teacher=teacher, labels=labels,
                    ints=(("divergence", divergence), ("teacher_input", teacher_input),
                          ("ignore_index", ignore_index), ("reduction", reduction)))
    loss = _f32_zeros(student)
    row = _f32_zeros(student, n) if rows else None
    gs, gt = _grad_buffer(student, want_student), _grad_buffer(teacher, want_teacher)
    _launch("divergence", student.device, _ptr(student), _dt(student), _ptr(teacher),
            _dt(teacher), _ptr(labels), n, c, divergence, beta, teacher_eps, teacher_input,
            temperature, ignore_index, reduction, 1.0, _ptr(loss), _ptr(row), _ptr(gs), _dt(gs),
            _ptr(gt), _dt(gt))
    return (row if rows else loss), gs, gt


@divergence_op.register_fake
def _(student, teacher, labels, divergence, beta, teacher_eps, teacher_input, temperature,
      ignore_index, reduction, rows, want_student, want_teacher):
    n = student.shape[0]
    return (_f32_empty(student, *((n,) if rows else ())),
            _grad_buffer(student, want_student), _grad_buffer(teacher, want_teacher))


# ---- cross-entropy ----

@torch.library.custom_op("distillation::cross_entropy", mutates_args=())
def cross_entropy_op(student: Tensor, labels: Tensor, label_smoothing: float, ignore_index: int,
                     reduction: int, rows: bool, want_student: bool) -> tuple[Tensor, Tensor]:
    """Cross-entropy with hard labels: (loss, grad_student or empty)."""
    if labels is None:
        raise ValueError("distillation::cross_entropy: labels are required")
    n, c = _op_rows("cross_entropy", student, labels=labels,
                    ints=(("ignore_index", ignore_index), ("reduction", reduction)))
    loss = _f32_zeros(student)
    row = _f32_zeros(student, n) if rows else None
    gs = _grad_buffer(student, want_student)
    _launch("cross_entropy", student.device, _ptr(student), _dt(student), _ptr(labels), n, c,
            label_smoothing, ignore_index, reduction, 1.0, _ptr(loss), _ptr(row), _ptr(gs),
            _dt(gs))
    return (row if rows else loss), gs


@cross_entropy_op.register_fake
def _(student, labels, label_smoothing, ignore_index, reduction, rows, want_student):
    n = student.shape[0]
    return _f32_empty(student, *((n,) if rows else ())), _grad_buffer(student, want_student)


# ---- decoupled knowledge distillation ----

@torch.library.custom_op("distillation::dkd", mutates_args=())
def dkd_op(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float,
           ce_weight: float, tckd_weight: float, nckd_weight: float, label_smoothing: float,
           ignore_index: int, reduction: int, rows: bool,
           want_student: bool) -> tuple[Tensor, Tensor]:
    """DKD ``ce_weight * CE + T^2 * (tckd_weight * TCKD + nckd_weight * NCKD)`` on ``[N, C]``
    float32 logits (``C >= 2``) and ``[N]`` int32 labels: (loss, grad_student or empty). The
    teacher is detached (no teacher gradient)."""
    n, c = _op_rows("dkd", student, teacher=teacher, labels=labels,
                    ints=(("ignore_index", ignore_index), ("reduction", reduction)))
    loss = _f32_zeros(student)
    row = _f32_zeros(student, n) if rows else None
    gs = _grad_buffer(student, want_student)
    _launch("dkd", student.device, _ptr(student), _dt(student), _ptr(teacher), _dt(teacher),
            _ptr(labels), n, c, temperature, ce_weight, tckd_weight, nckd_weight, label_smoothing,
            ignore_index, reduction, 1.0, _ptr(loss), _ptr(row), _ptr(gs), _dt(gs))
    return (row if rows else loss), gs


@dkd_op.register_fake
def _(student, teacher, labels, temperature, ce_weight, tckd_weight, nckd_weight,
      label_smoothing, ignore_index, reduction, rows, want_student):
    n = student.shape[0]
    return _f32_empty(student, *((n,) if rows else ())), _grad_buffer(student, want_student)


# ---- sparse top-k teachers ----

@torch.library.custom_op("distillation::sparse_kd", mutates_args=())
def sparse_kd_op(student: Tensor, indices: Tensor, values: Tensor, labels: Optional[Tensor],
                 divergence: int, beta: float, values_kind: int, tail: int, temperature: float,
                 alpha: float, label_smoothing: float, ignore_index: int, reduction: int,
                 rows: bool, want_student: bool) -> tuple[Tensor, Tensor]:
    """``alpha * CE + (1 - alpha) * T^2 * D(Q || P)`` for ``[N, C]`` logits and a teacher of
    ``[N, k]`` int32 indices and values (``docs/LOSSES.md`` section 10): (loss, grad_student or
    empty). The teacher is a constant."""
    n, c = _op_rows("sparse_kd", student, labels=labels,
                    ints=(("divergence", divergence), ("values_kind", values_kind),
                          ("tail", tail), ("ignore_index", ignore_index),
                          ("reduction", reduction)))
    _op_arrays("sparse_kd", student.device, int32s=(("indices", indices, (n, -1)),))
    k = indices.shape[1]
    _op_arrays("sparse_kd", student.device, floats=(("values", values, (n, k)),))
    loss = _f32_zeros(student)
    row = _f32_zeros(student, n) if rows else None
    gs = _grad_buffer(student, want_student)
    _launch("sparse_kd", student.device, _ptr(student), _dt(student), _ptr(indices),
            _ptr(values), _dt(values), _ptr(labels), n, c, k, divergence, beta, values_kind,
            tail, temperature, alpha, label_smoothing, ignore_index, reduction, 1.0, _ptr(loss),
            _ptr(row), _ptr(gs), _dt(gs))
    return (row if rows else loss), gs


@sparse_kd_op.register_fake
def _(student, indices, values, labels, divergence, beta, values_kind, tail, temperature, alpha,
      label_smoothing, ignore_index, reduction, rows, want_student):
    n = student.shape[0]
    return _f32_empty(student, *((n,) if rows else ())), _grad_buffer(student, want_student)


# ---- feature MSE ----

@torch.library.custom_op("distillation::mse", mutates_args=())
def mse_op(a: Tensor, b: Tensor, want_a: bool, want_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``mean((a - b)^2)`` over flat float32 ``a``, ``b``: (loss, grad_a or empty, grad_b or
    empty)."""
    for name, t in (("a", a), ("b", b)):
        if (not isinstance(t, Tensor) or t.dtype != torch.float32 or not t.is_contiguous()
                or t.device.type not in ("cpu", "cuda")):
            raise ValueError(f"distillation::mse: {name} must be a contiguous float32 CPU or "
                             "CUDA tensor")
    if a.shape != b.shape or a.device != b.device:
        raise ValueError("distillation::mse: a and b must have one shape on one device")
    loss = a.new_zeros(())
    ga, gb = _grad_buffer(a, want_a), _grad_buffer(b, want_b)
    _launch("mse", a.device, _ptr(a), _ptr(b), a.numel(), 1.0, _ptr(loss), _ptr(ga), _ptr(gb))
    return loss, ga, gb


@mse_op.register_fake
def _(a, b, want_a, want_b):
    return a.new_empty(()), _grad_buffer(a, want_a), _grad_buffer(b, want_b)


# ---- autograd: the saved gradients times the upstream gradient ----

def _setup(ctx, inputs, output, rows_at: Optional[int]):
    ctx.rows = bool(inputs[rows_at]) if rows_at is not None else False
    grads = output[1:]
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)


def _scaled(grad: Tensor, upstream: Tensor, rows: bool) -> Optional[Tensor]:
    if grad.numel() == 0:
        return None
    # The kernel's gradient is already in the input's dtype; the upstream (float32, as the loss)
    # scales it in float32 and the product returns in that dtype.
    return (grad * (upstream[:, None] if rows else upstream)).to(grad.dtype)


def _backward(ctx, upstream, *_ignored):
    if torch.is_grad_enabled():
        # (create_graph=True: the saved gradients are constants here, so a second derivative
        # would silently miss the loss's curvature)
        raise RuntimeError("distillation's losses have no double backward (create_graph=True, "
                           "a gradient penalty, Hessian-vector products): compute the first "
                           "gradient without create_graph, or use a PyTorch composition")
    return tuple(_scaled(g, upstream, ctx.rows) for g in ctx.saved_tensors)


hinton_op.register_autograd(
    lambda ctx, upstream, *_: _backward(ctx, upstream) + (None,) * 9,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 8))
divergence_op.register_autograd(
    lambda ctx, upstream, *_: (lambda gs, gt: (gs, gt, None) + (None,) * 10)(
        *_backward(ctx, upstream)),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 10))
cross_entropy_op.register_autograd(
    lambda ctx, upstream, *_: _backward(ctx, upstream) + (None,) * 6,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 5))
dkd_op.register_autograd(
    lambda ctx, upstream, *_: _backward(ctx, upstream) + (None,) * 11,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 10))
sparse_kd_op.register_autograd(
    lambda ctx, upstream, *_: _backward(ctx, upstream) + (None,) * 14,
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 13))
mse_op.register_autograd(
    lambda ctx, upstream, *_: _backward(ctx, upstream) + (None, None),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, None))


# ---- argument preparation (plain PyTorch ops, traced by torch.compile) ----

def _float_rows(x, name: str) -> Tensor:
    """``[..., C]`` floating logits as contiguous ``[N, C]``: float32, bfloat16 and float16 as
    they are, other floating dtypes (float64) converted to float32."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of logits, got {x.dtype}: "
                        "convert it with .float()")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [N, C] (or [..., C]), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): pass at least one row and "
                         "one class")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {x.device}: only CPU and CUDA tensors are supported")
    if x.dtype not in _DTYPES:
        x = x.to(torch.float32)
    return x.contiguous().reshape(-1, x.shape[-1])


def _int32(y: Tensor, ignore: Optional[int] = None) -> Tensor:
    """An integer tensor as contiguous int32 of the same shape. A value outside int32 becomes
    one that is out of any class range and is not ``ignore`` (the clamp's bound, or the other
    bound where that is ``ignore``), so the checks after it refuse it instead of wrapping it to a
    valid class or masking the row."""
    y = y.to(torch.int64)
    low, high = _I32_MIN, _I32_MAX
    if ignore == low:
        low = high
    elif ignore == high:
        high = low
    y = torch.where(y < _I32_MIN, torch.full_like(y, low), y)
    y = torch.where(y > _I32_MAX, torch.full_like(y, high), y)
    return y.to(torch.int32).contiguous()


def _labels(y, like: Tensor, rows: int, name: str = "labels",
            ignore: Optional[int] = None) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class indices (int8, int16, "
                        f"int32, int64 or uint8), got {y.dtype}: convert it with .long()")
    if y.numel() != rows:
        raise ValueError(f"{name} has {y.numel()} elements (shape {tuple(y.shape)}) but the "
                         f"logits have {rows} rows: one label per row")
    if y.device != like.device:
        raise ValueError(f"{name} is on {y.device} but the logits are on {like.device}")
    # An int64 label outside the int32 range stays out of range (an error), instead of wrapping
    # to a valid class or landing on ignore_index.
    return _int32(y.reshape(-1), ignore)


def _same_shape(a: Tensor, b: Tensor, an: str, bn: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{an} has shape {tuple(a.shape)} but {bn} has {tuple(b.shape)}: they "
                         "must match")
    if a.device != b.device:
        raise ValueError(f"{an} is on {a.device} but {bn} is on {b.device}")


def _constants(**hyper) -> None:
    """Hyperparameters are constants of the kernels: a tensor that requires grad (a learnable
    temperature) is refused, since no gradient would flow to it."""
    for name, x in hyper.items():
        if isinstance(x, Tensor) and x.requires_grad:
            raise TypeError(f"{name} is a tensor that requires grad: the loss takes {name} as a "
                            "constant (no gradient flows to it); pass a float or a detached "
                            "tensor")


def _ignore(ignore_index: int) -> int:
    if not _I32_MIN <= int(ignore_index) <= _I32_MAX:
        raise ValueError(f"ignore_index = {ignore_index} must fit in int32")
    return int(ignore_index)


def _reduction(reduction: str, allowed) -> tuple[int, bool]:
    if reduction == "mean" and "mean" not in allowed:
        raise ValueError("reduction='mean' would average over every element (as F.kl_div's "
                         "'mean'), which is not a distillation loss: use 'batchmean' (mean over "
                         "rows), 'sum' or 'none'")
    if reduction not in allowed:
        raise ValueError(f"reduction = {reduction!r}: use one of {', '.join(allowed)}")
    return (1, True) if reduction == "none" else (1 if reduction == "sum" else 0, False)


def _wants(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _out(loss: Tensor, like: Tensor, rows: bool) -> Tensor:
    loss = loss.reshape(like.shape[:-1]) if rows else loss
    return loss.to(torch.float64) if like.dtype == torch.float64 else loss


def _choice(value: str, table: dict, name: str) -> int:
    if value not in table:
        raise ValueError(f"{name} = {value!r}: use one of {', '.join(table)}")
    return table[value]


# ---- the functional API ----

def kd_loss(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float = 4.0,
            alpha: float = 0.2, *, label_smoothing: float = 0.0, ignore_index: int = -100,
            reduction: str = "batchmean") -> Tensor:
    """The fused Hinton loss ``alpha * CE(student, labels) + (1 - alpha) * T^2 *
    KL(softmax(teacher/T) || softmax(student/T))`` (``docs/LOSSES.md`` section 4) on ``[..., C]``
    logits and ``[...]`` labels. ``reduction``: ``"batchmean"`` (mean over the rows whose label is
    not ``ignore_index``), ``"sum"`` or ``"none"`` (the row losses). Differentiable in
    ``student`` and, when it requires grad (online distillation), ``teacher``."""
    s, t = _float_rows(student, "student"), _float_rows(teacher, "teacher")
    _same_shape(student, teacher, "student", "teacher")
    y = _labels(labels, s, s.shape[0], ignore=_ignore(ignore_index))
    red, rows = _reduction(reduction, _KL_REDUCTIONS)
    _constants(temperature=temperature, alpha=alpha)
    loss, _, _ = hinton_op(s, t, y, float(temperature), float(alpha), float(label_smoothing),
                           _ignore(ignore_index), red, rows, _wants(s), _wants(t))
    return _out(loss, student, rows)


def soft_target_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, *,
                     divergence: str = "forward_kl", beta: float = 0.5,
                     teacher_input: str = "logits", teacher_eps: float = 0.0,
                     labels: Optional[Tensor] = None, ignore_index: int = -100,
                     reduction: str = "batchmean", scale_t2: bool = True) -> Tensor:
    """``T^2 * D(q || p)`` (``docs/LOSSES.md`` section 2) with ``p = softmax(student/T)`` and
    ``q`` the teacher given as ``"logits"`` (``softmax(teacher/T)``), ``"probs"`` or
    ``"logprobs"`` (T applies to the student only); ``divergence`` ``"forward_kl"``
    (``KL(q||p)``), ``"reverse_kl"`` or ``"jsd"`` (``beta * KL(q||M) + (1-beta) * KL(p||M)``,
    ``M = beta q + (1-beta) p``, beta in (0, 1)). ``scale_t2=False`` drops the ``T^2`` factor
    (TRL's and Liger's convention). ``teacher_eps``: reverse KL with probs / logprobs only, a
    floor on ``q`` inside the log. ``labels`` (optional) mask rows whose label is
    ``ignore_index``."""
    s, t = _float_rows(student, "student"), _float_rows(teacher, "teacher")
    _same_shape(student, teacher, "student", "teacher")
    y = None if labels is None else _labels(labels, s, s.shape[0], ignore=_ignore(ignore_index))
    red, rows = _reduction(reduction, _KL_REDUCTIONS)
    div = _choice(divergence, DIVERGENCES, "divergence")
    tin = _choice(teacher_input, TEACHER_INPUTS, "teacher_input")
    _constants(temperature=temperature)
    loss, _, _ = divergence_op(s, t, y, div, float(beta), float(teacher_eps), tin,
                               float(temperature), _ignore(ignore_index), red, rows, _wants(s),
                               _wants(t) and tin == 0)
    if not scale_t2:
        loss = loss / (float(temperature) ** 2)
    return _out(loss, student, rows)


def dkd_loss(student: Tensor, teacher: Tensor, labels: Tensor, temperature: float = 4.0,
             alpha: float = 1.0, beta: float = 8.0, *, ce_weight: float = 1.0,
             warmup: float = 1.0, label_smoothing: float = 0.0, ignore_index: int = -100,
             reduction: str = "batchmean") -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022; ``docs/LOSSES.md`` section 8),
    one fused kernel: ``ce_weight * CE(student, labels) + warmup * T^2 * (alpha * TCKD + beta *
    NCKD)`` with ``p = softmax(student/T)``, ``q = softmax(teacher/T)`` and the label's class g:
    TCKD the KL of the binary ``[q_g, 1 - q_g]`` against ``[p_g, 1 - p_g]``, NCKD the KL among
    the other classes renormalised. The paper's defaults: T 4, alpha 1, beta 8, ``warmup =
    min(epoch / 20, 1)`` (pass it; :class:`distillation.DKDLoss` computes it from the epoch).
    ``[..., C]`` logits (C >= 2), ``[...]`` labels; ``reduction`` ``"batchmean"`` (mean over the
    rows whose label is not ``ignore_index``), ``"sum"`` or ``"none"``. Differentiable in
    ``student``; the teacher is detached (no gradient even if it requires one)."""
    s, t = _float_rows(student, "student"), _float_rows(teacher, "teacher")
    _same_shape(student, teacher, "student", "teacher")
    y = _labels(labels, s, s.shape[0], ignore=_ignore(ignore_index))
    red, rows = _reduction(reduction, _KL_REDUCTIONS)
    w = float(warmup)
    _constants(temperature=temperature, alpha=alpha)
    loss, _ = dkd_op(s, t.detach(), y, float(temperature), float(ce_weight), float(alpha) * w,
                     float(beta) * w, float(label_smoothing), _ignore(ignore_index), red, rows,
                     _wants(s))
    return _out(loss, student, rows)


def sparse_kd_loss(student: Tensor, indices: Tensor, values: Tensor, temperature: float = 1.0,
                   *, divergence: str = "forward_kl", beta: float = 0.5,
                   values_kind: str = "logprobs", tail: str = "renormalize",
                   labels: Optional[Tensor] = None, alpha: float = 0.0,
                   label_smoothing: float = 0.0, ignore_index: int = -100,
                   reduction: str = "batchmean") -> Tensor:
    """Distillation from a sparse top-k teacher (``docs/LOSSES.md`` section 10): per row ``k``
    class ``indices`` and ``values`` (``[..., k]``; ``values_kind`` ``"logprobs"``, the teacher's
    log-probabilities as a top-k cache stores them, re-tempered as ``log q / T`` and renormalised
    over the top-k, or ``"logits"``), the student ``[..., C]`` dense. ``tail``: ``"renormalize"``
    (the top-k is the whole distribution), ``"bucket"`` (one extra class of mass ``1 - sum
    exp(values)`` against the student's mass outside the top-k, TRL's ``loss_add_tail``) or
    ``"uniform"`` (that mass spread over the other classes, DistillKit's). ``divergence`` as
    :func:`soft_target_loss`. The loss is ``alpha * CE(student, labels) + (1 - alpha) * T^2 *
    D``; ``labels`` (required when ``alpha > 0``) mask rows equal to ``ignore_index``.
    Repeated or out-of-range indices are an error on CPU tensors; on CUDA tensors they are not
    read back: such a row's loss and gradient are NaN. Differentiable in ``student``."""
    s = _float_rows(student, "student")
    if not isinstance(indices, Tensor) or indices.dtype not in _INT_DTYPES:
        raise TypeError("indices must be an integer torch.Tensor of class indices, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.shape[:-1] != student.shape[:-1] or indices.dim() < 1:
        raise ValueError(f"indices has shape {tuple(indices.shape)} but the student "
                         f"{tuple(student.shape)}: one row of k indices per student row")
    if indices.shape[-1] < 1:
        raise ValueError("indices has k = 0 entries per row: a sparse teacher needs 1 <= k <= "
                         "min(C, 1024)")
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.shape != indices.shape:
        raise ValueError("values must be a tensor of the indices' shape [..., k]")
    if indices.device != s.device or values.device != s.device:
        raise ValueError("indices and values must be on the student's device")
    k = indices.shape[-1]
    idx = _int32(indices.reshape(-1, k))
    v = _float_rows(values.detach(), "values")
    y = None if labels is None else _labels(labels, s, s.shape[0], ignore=_ignore(ignore_index))
    red, rows = _reduction(reduction, _KL_REDUCTIONS)
    div = _choice(divergence, DIVERGENCES, "divergence")
    kind = _choice(values_kind, SPARSE_VALUES, "values_kind")
    tl = _choice(tail, SPARSE_TAILS, "tail")
    _constants(temperature=temperature, alpha=alpha)
    loss, _ = sparse_kd_op(s, idx, v, y, div, float(beta), kind, tl, float(temperature),
                           float(alpha), float(label_smoothing), _ignore(ignore_index), red, rows,
                           _wants(s))
    return _out(loss, student, rows)


def cross_entropy(student: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy`` on ``[..., C]`` logits (``"mean"`` and ``"batchmean"`` are both the
    mean over rows whose label is not ``ignore_index``; with no such row the loss is 0, not
    PyTorch's NaN)."""
    s = _float_rows(student, "student")
    y = _labels(labels, s, s.shape[0], ignore=_ignore(ignore_index))
    red, rows = _reduction(reduction, _CE_REDUCTIONS)
    loss, _ = cross_entropy_op(s, y, float(label_smoothing), _ignore(ignore_index), red, rows,
                               _wants(s))
    return _out(loss, student, rows)


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Feature MSE ``mean((a - b)^2)`` (``F.mse_loss``); differentiable in both."""
    for x, name in ((a, "a"), (b, "b")):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {x.device}: only CPU and CUDA tensors are supported")
    _same_shape(a, b, "a", "b")
    if a.numel() == 0:
        raise ValueError("a and b are empty: pass at least one element")
    x, z = a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
    loss, _, _ = mse_op(x.reshape(-1), z.reshape(-1), _wants(x), _wants(z))
    return loss.to(torch.float64) if a.dtype == torch.float64 else loss
