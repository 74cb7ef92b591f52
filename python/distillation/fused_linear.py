"""The fused linear layer + distillation loss (``docs/LOSSES.md`` section 11) as a PyTorch custom
op: the student's logits ``h @ W.T (+ b)`` and the teacher's are computed a chunk of rows at a
time inside the library, with the loss and its gradients, so ``[N, V]`` logits are never held.

    loss = fused_linear_kd_loss(h, lm_head.weight, h_t, teacher_head.weight, labels,
                                temperature=2.0, alpha=0.5)
    loss.backward()    # grads for h, lm_head.weight (and a bias)

The forward computes the loss and the gradients of the hidden states, the weight and the bias
together and keeps them; the backward multiplies them by the upstream gradient. The teacher is a
constant (no gradient). CPU tensors run on the fast CPU backend (``dst_fast_fused_linear_kd``,
which copies the inputs into its buffers, never the logits), CUDA tensors on the CUDA backend on
PyTorch's current stream (``dst_cuda_fused_linear_kd``, which synchronizes that stream: it reads
the labels and the loss back). float32, bfloat16 and float16 tensors are read as they are (each
gradient returns in its input's dtype, rounded once); float64 is computed in float32.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor

from . import _lib
from .ops import (DIVERGENCES, SPARSE_TAILS, SPARSE_VALUES, _DTYPES, _INT_DTYPES, _choice,
                  _constants, _dt, _f32_empty, _f32_zeros, _ignore, _int32, _labels, _launch,
                  _op_arrays, _op_lead, _ptr, _scaled, _wants)

WEIGHTINGS = {"hinton": 0, "liger": 1}
_REDUCTIONS = {"batchmean": 0, "mean": 0, "sum": 1}


def _grad_like(x: Optional[Tensor], wanted: bool, zero: bool, hidden: Tensor) -> Tensor:
    """A gradient buffer of ``x``'s shape and dtype (zeros where the library adds to it), or an
    empty tensor (on the hidden states' device) when not wanted."""
    if x is None or not wanted:
        return hidden.new_empty(0)
    return torch.zeros_like(x) if zero else torch.empty_like(x)


@torch.library.custom_op("distillation::fused_linear_kd", mutates_args=())
def fused_linear_kd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                       teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                       teacher_bias: Optional[Tensor], teacher_logits: Optional[Tensor],
                       labels: Optional[Tensor], temperature: float, divergence: int, beta: float,
                       weighting: int, alpha: float, weight_hard: float, weight_soft: float,
                       label_smoothing: float, ignore_index: int, reduction: int,
                       memory_budget: int, chunk_rows: int, want_hidden: bool, want_weight: bool,
                       want_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[N, H]`` hidden states, ``[V, H]`` weight, ``[V]`` bias; the teacher as a layer
    (``[N, H_t]``, ``[V_t, H_t]``, ``[V_t]``, ``V_t >= V``) or ``[N, V]`` logits or none;
    ``[N]`` int32 labels. Returns (loss, grad_hidden, grad_weight, grad_bias), each gradient
    empty when not wanted."""
    op = "fused_linear_kd"
    n, h = _op_lead(op, "hidden", hidden)
    _op_arrays(op, hidden.device, floats=(("weight", weight, (-1, h)),
                                          ("teacher_weight", teacher_weight, (-1, -1))))
    v = weight.shape[0]
    ht, vt = (0, 0) if teacher_weight is None else (teacher_weight.shape[1],
                                                     teacher_weight.shape[0])
    _op_arrays(op, hidden.device,
               floats=(("hidden", hidden, (n, h)), ("bias", bias, (v,)),
                       ("teacher_hidden", teacher_hidden, (n, ht)),
                       ("teacher_bias", teacher_bias, (vt,)),
                       ("teacher_logits", teacher_logits, (n, v))),
               int32s=(("labels", labels, (n,)),),
               ints=(("divergence", divergence), ("weighting", weighting),
                     ("ignore_index", ignore_index), ("reduction", reduction)))
    spec = _lib.FusedLinearSpec(n, h, v, ht, vt, temperature, divergence, beta, weighting, alpha,
                                weight_hard, weight_soft, label_smoothing, ignore_index,
                                reduction, 1.0, memory_budget, chunk_rows)
    loss = _f32_zeros(hidden)
    gh = _grad_like(hidden, want_hidden, False, hidden)
    # grad_weight and grad_bias are added to by the library: zeros for this call's own gradient.
    gw = _grad_like(weight, want_weight, True, hidden)
    gb = _grad_like(bias, want_bias, True, hidden)
    _launch("fused_linear_kd", hidden.device, ctypes.byref(spec),
            _ptr(hidden), _dt(hidden), _ptr(weight), _dt(weight), _ptr(bias), _dt(bias),
            _ptr(teacher_hidden), _dt(teacher_hidden), _ptr(teacher_weight), _dt(teacher_weight),
            _ptr(teacher_bias), _dt(teacher_bias), _ptr(teacher_logits), _dt(teacher_logits),
            _ptr(labels), _ptr(loss), _ptr(gh), _dt(gh), _ptr(gw), _dt(gw), _ptr(gb), _dt(gb))
    return loss, gh, gw, gb


@fused_linear_kd_op.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, labels,
      temperature, divergence, beta, weighting, alpha, weight_hard, weight_soft, label_smoothing,
      ignore_index, reduction, memory_budget, chunk_rows, want_hidden, want_weight, want_bias):
    return (_f32_empty(hidden), _grad_like(hidden, want_hidden, False, hidden),
            _grad_like(weight, want_weight, False, hidden),
            _grad_like(bias, want_bias, False, hidden))


def _setup(ctx, inputs, output):
    grads = output[1:]
    ctx.mark_non_differentiable(*grads)
    ctx.save_for_backward(*grads)


def _backward(ctx, upstream, *_ignored):
    gh, gw, gb = (_scaled(g, upstream, False) for g in ctx.saved_tensors)
    return (gh, gw, gb) + (None,) * 20


fused_linear_kd_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("distillation::fused_linear_sparse_kd", mutates_args=())
def fused_linear_sparse_kd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                              indices: Tensor, values: Tensor, labels: Optional[Tensor],
                              values_kind: int, tail: int, temperature: float, divergence: int,
                              beta: float, weighting: int, alpha: float, weight_hard: float,
                              weight_soft: float, label_smoothing: float, ignore_index: int,
                              reduction: int, memory_budget: int, chunk_rows: int,
                              want_hidden: bool, want_weight: bool,
                              want_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As :func:`fused_linear_kd_op` with a sparse top-k teacher: ``[N, k]`` int32 ``indices``
    and their ``values`` (``values_kind`` 0 log-probabilities, 1 logits; ``tail`` 0
    renormalize, 1 bucket, 2 uniform)."""
    op = "fused_linear_sparse_kd"
    n, h = _op_lead(op, "hidden", hidden)
    _op_arrays(op, hidden.device, floats=(("weight", weight, (-1, h)),),
               int32s=(("indices", indices, (n, -1)),))
    v, k = weight.shape[0], indices.shape[1]
    _op_arrays(op, hidden.device,
               floats=(("hidden", hidden, (n, h)), ("bias", bias, (v,)),
                       ("values", values, (n, k))),
               int32s=(("labels", labels, (n,)),),
               ints=(("values_kind", values_kind), ("tail", tail), ("divergence", divergence),
                     ("weighting", weighting), ("ignore_index", ignore_index),
                     ("reduction", reduction)))
    spec = _lib.FusedLinearSpec(n, h, v, 0, 0, temperature, divergence, beta, weighting, alpha,
                                weight_hard, weight_soft, label_smoothing, ignore_index,
                                reduction, 1.0, memory_budget, chunk_rows)
    loss = _f32_zeros(hidden)
    gh = _grad_like(hidden, want_hidden, False, hidden)
    gw = _grad_like(weight, want_weight, True, hidden)
    gb = _grad_like(bias, want_bias, True, hidden)
    _launch("fused_linear_sparse_kd", hidden.device, ctypes.byref(spec),
            _ptr(hidden), _dt(hidden), _ptr(weight), _dt(weight), _ptr(bias), _dt(bias),
            k, _ptr(indices), _ptr(values), _dt(values), values_kind, tail,
            _ptr(labels), _ptr(loss), _ptr(gh), _dt(gh), _ptr(gw), _dt(gw), _ptr(gb), _dt(gb))
    return loss, gh, gw, gb


@fused_linear_sparse_kd_op.register_fake
def _(hidden, weight, bias, indices, values, labels, values_kind, tail, temperature, divergence,
      beta, weighting, alpha, weight_hard, weight_soft, label_smoothing, ignore_index, reduction,
      memory_budget, chunk_rows, want_hidden, want_weight, want_bias):
    return (_f32_empty(hidden), _grad_like(hidden, want_hidden, False, hidden),
            _grad_like(weight, want_weight, False, hidden),
            _grad_like(bias, want_bias, False, hidden))


fused_linear_sparse_kd_op.register_autograd(_backward, setup_context=_setup)


def _matrix(x, name: str, rows: Optional[int] = None) -> Tensor:
    """A floating ``[..., K]`` tensor as contiguous ``[N, K]`` (float64 to float32)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"{name} must have shape [N, K] (or [..., K]) with N, K >= 1, got "
                         f"{tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {x.device}: only CPU and CUDA tensors are supported")
    if x.dtype not in _DTYPES:
        x = x.to(torch.float32)
    x = x.contiguous().reshape(-1, x.shape[-1])
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows (shape {tuple(x.shape)}) but the "
                         f"student's hidden states have {rows}: one row per token")
    return x


def _detached(x, name: str) -> Tensor:
    """A teacher's tensor without its graph (the teacher is a constant)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.detach()


def _vector(x, name: str, length: int, like: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if x.shape != (length,):
        raise ValueError(f"{name} has shape {tuple(x.shape)}: it must be [{length}], one per "
                         "row of its weight")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the hidden states are on {like.device}")
    return (x if x.dtype in _DTYPES else x.to(torch.float32)).contiguous()


def _same_device(x: Tensor, like: Tensor, name: str) -> None:
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the hidden states are on {like.device}")


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor,
                         teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                         labels: Optional[Tensor], *, student_bias: Optional[Tensor] = None,
                         teacher_bias: Optional[Tensor] = None,
                         teacher_logits: Optional[Tensor] = None, temperature: float = 1.0,
                         alpha: float = 0.5, divergence: str = "forward_kl", beta: float = 0.5,
                         weighting: str = "hinton", weight_hard: float = 0.5,
                         weight_soft: float = 0.5, label_smoothing: float = 0.0,
                         ignore_index: int = -100, reduction: str = "batchmean",
                         memory_budget: Optional[int] = None,
                         chunk_rows: Optional[int] = None,
                         teacher_topk: Optional[tuple] = None, topk_values: str = "logprobs",
                         tail: str = "renormalize") -> Tensor:
    """The fused linear layer + distillation loss (``docs/LOSSES.md`` section 11): with
    ``s = student_hidden @ student_weight.T (+ student_bias)`` and ``t = (teacher_hidden @
    teacher_weight.T (+ teacher_bias))[:, :V]`` (a padded teacher vocabulary ``V_t > V`` is cut
    to the student's ``V``; or ``teacher_logits`` ``[..., V]`` given instead of the layer),
    ``w_hard * CE(s, labels) + w_soft * c_T * D(softmax(t/T) || softmax(s/T))``:

    - ``weighting="hinton"`` (default): ``w_hard = alpha``, ``w_soft = 1 - alpha``, ``c_T = T^2``;
    - ``weighting="liger"``: ``w_hard = weight_hard``, ``w_soft = weight_soft``, ``c_T = 1``
      (Liger-Kernel's ``LigerFusedLinear*Loss`` and TRL's objective).

    ``divergence``: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (``beta`` in (0, 1)). Both
    terms are means over the rows whose label is not ``ignore_index`` (``"batchmean"``; ``"mean"``
    is the same) or sums (``"sum"``). ``labels`` is required with a cross-entropy term, else
    optional (masking rows). ``[..., H]`` hidden states are taken as ``[N, H]`` rows.
    ``memory_budget`` (bytes of scratch per chunk of rows, default 48 MiB) or ``chunk_rows`` set
    the chunking. Returns the float32 loss; differentiable in ``student_hidden``,
    ``student_weight`` and ``student_bias`` (the teacher is a constant).

    A sparse top-k teacher instead (``docs/LOSSES.md`` section 10): ``teacher_topk=(indices,
    values)``, each ``[..., k]`` (``k`` distinct classes per row and their values,
    ``topk_values`` ``"logprobs"`` as a top-k cache stores them or ``"logits"``), with ``tail``
    ``"renormalize"``, ``"bucket"`` or ``"uniform"`` as :func:`sparse_kd_loss`; pass
    ``teacher_hidden`` and ``teacher_weight`` as ``None``. Repeated or out-of-range indices are an
    error naming the row."""
    h = _matrix(student_hidden, "student_hidden")
    n = h.shape[0]
    if not isinstance(student_weight, Tensor) or student_weight.dim() != 2:
        raise ValueError("student_weight must be a [V, H] tensor (the output layer's weight)")
    w = _matrix(student_weight, "student_weight")
    _same_device(w, h, "student_weight")
    v = w.shape[0]
    if w.shape[1] != h.shape[1]:
        raise ValueError(f"student_weight is {tuple(w.shape)} but the hidden size of "
                         f"student_hidden is {h.shape[1]}: the weight is [V, H]")
    b = None if student_bias is None else _vector(student_bias, "student_bias", v, h)
    th = tw = tb = tl = None
    topk = None
    if teacher_topk is not None:
        if (teacher_logits is not None or teacher_hidden is not None or teacher_weight is not None
                or teacher_bias is not None):
            raise ValueError("pass the teacher in one form: teacher_topk, or teacher_logits, or "
                             "teacher_hidden and teacher_weight")
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError("teacher_topk must be a pair (indices, values) of [..., k] tensors")
        indices, values = teacher_topk
        if not isinstance(indices, Tensor) or indices.dtype not in _INT_DTYPES:
            raise TypeError("teacher_topk's indices must be an integer torch.Tensor of class "
                            f"indices, got {getattr(indices, 'dtype', type(indices).__name__)}")
        if not isinstance(values, Tensor) or values.shape != indices.shape or indices.dim() < 1:
            raise ValueError("teacher_topk's values must be a tensor of the indices' shape [..., k]")
        k = indices.shape[-1]
        if k < 1 or indices.numel() // k != n:
            raise ValueError(f"teacher_topk has shape {tuple(indices.shape)}: it needs k >= 1 "
                             f"classes for each of the {n} rows of the hidden states")
        _same_device(indices, h, "teacher_topk's indices")
        idx = _int32(indices.reshape(n, k))
        vals = _matrix(values.detach().reshape(n, k), "teacher_topk's values", n)
        _same_device(vals, h, "teacher_topk's values")
        topk = (idx, vals, _choice(topk_values, SPARSE_VALUES, "topk_values"),
                _choice(tail, SPARSE_TAILS, "tail"))
    elif teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("pass the teacher as teacher_hidden and teacher_weight, or as "
                             "teacher_logits, not both")
        if teacher_bias is not None:
            raise ValueError("teacher_bias is given with teacher_logits, where it would be "
                             "ignored: add it to the logits, or pass the teacher as "
                             "teacher_hidden, teacher_weight and teacher_bias")
        tl = _matrix(_detached(teacher_logits, "teacher_logits"), "teacher_logits", n)
        _same_device(tl, h, "teacher_logits")
        if tl.shape[1] != v:
            raise ValueError(f"teacher_logits has {tl.shape[1]} classes but the student {v}")
    elif teacher_hidden is not None or teacher_weight is not None:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a teacher layer needs both teacher_hidden and teacher_weight")
        th = _matrix(_detached(teacher_hidden, "teacher_hidden"), "teacher_hidden", n)
        if not isinstance(teacher_weight, Tensor) or teacher_weight.dim() != 2:
            raise ValueError("teacher_weight must be a [V_t, H_t] tensor")
        tw = _matrix(teacher_weight.detach(), "teacher_weight")
        _same_device(th, h, "teacher_hidden")
        _same_device(tw, h, "teacher_weight")
        if tw.shape[1] != th.shape[1]:
            raise ValueError(f"teacher_weight is {tuple(tw.shape)} but the hidden size of "
                             f"teacher_hidden is {th.shape[1]}: the weight is [V_t, H_t]")
        if teacher_bias is not None:
            tb = _vector(_detached(teacher_bias, "teacher_bias"), "teacher_bias", tw.shape[0], h)
    elif teacher_bias is not None:
        raise ValueError("teacher_bias is given without teacher_hidden and teacher_weight")
    y = None if labels is None else _labels(labels, h, n, ignore=_ignore(ignore_index))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction = {reduction!r}: use 'batchmean' (or 'mean') or 'sum' (the "
                         "fused loss is a scalar: no 'none')")
    div = _choice(divergence, DIVERGENCES, "divergence")
    wt = _choice(weighting, WEIGHTINGS, "weighting")
    for name, x in (("memory_budget", memory_budget), ("chunk_rows", chunk_rows)):
        if x is not None and int(x) < 1:
            raise ValueError(f"{name} = {x} must be at least 1 (None: the default)")
    if topk is not None:
        idx, vals, kind, tl_code = topk
        _constants(temperature=temperature, alpha=alpha)
        loss, _, _, _ = fused_linear_sparse_kd_op(
            h, w, b, idx, vals, y, kind, tl_code, float(temperature), div, float(beta), wt,
            float(alpha), float(weight_hard), float(weight_soft), float(label_smoothing),
            _ignore(ignore_index), _REDUCTIONS[reduction], int(memory_budget or 0),
            int(chunk_rows or 0), _wants(h), _wants(w), b is not None and _wants(b))
        return loss
    _constants(temperature=temperature, alpha=alpha)
    loss, _, _, _ = fused_linear_kd_op(
        h, w, b, th, tw, tb, tl, y, float(temperature), div, float(beta), wt, float(alpha),
        float(weight_hard), float(weight_soft), float(label_smoothing), _ignore(ignore_index),
        _REDUCTIONS[reduction], int(memory_budget or 0), int(chunk_rows or 0), _wants(h),
        _wants(w), b is not None and _wants(b))
    return loss
