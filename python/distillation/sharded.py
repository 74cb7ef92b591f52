"""Vocab-sharded losses for vocab-parallel output layers (``docs/LOSSES.md`` section 9).

Each rank holds the columns ``offset:offset + width`` of the ``[N, C]`` student (and teacher)
logits and the same global labels. The two phases run on the crate's fast CPU backend for CPU
float32 tensors (``dst_fast_sharded_*``) and on its CUDA kernels for CUDA float32 tensors
(``dst_cuda_sharded_*`` on PyTorch's current stream; the stats' rescale between the two
all-reduces runs on a host copy of the ``[N, 11]`` stats); the collectives are
torch.distributed's::

    import distillation.sharded as sh
    loss = sh.sharded_kd_loss(student_shard, teacher_shard, labels, classes=C, offset=off,
                              loss="hinton", temperature=2.0, alpha=0.5, group=group)
    loss.backward()          # student_shard.grad: the shard's columns of the unsharded gradient

or step by step: ``stats`` (phase 1), ``all_reduce_stats`` (all-reduce MAX of the maxima plane,
``rescale_stats``, all-reduce SUM of the sums plane), ``jsd_terms`` + ``all_reduce(SUM)`` for
JSD, then ``loss_and_grad`` (phase 2: this shard's part of the loss and its gradient columns).
In one process, ``combine_stats`` combines a list of shards' stats.

``loss="dkd"`` is decoupled KD (section 8) with its stats over the rest of each row (the label's
column left out); its teacher is logits and gets no gradient.

Logits may be float32, bfloat16 or float16 (or float64): the math is float32 (half inputs convert
exactly) and ``sharded_kd_loss``'s gradients return in each input's dtype, rounded once.

The teacher may be given as logits (the default), probabilities or log-probabilities
(``teacher_input="logits" | "probs" | "logprobs"``, as ``SoftTargetLoss``): the temperature then
applies to the student only, a row's probabilities sum to 1 over every shard, and the teacher
gets no gradient.
"""

from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _lib
from .ops import _int32

MAXIMA, SUMS = 2, 9
STATS = MAXIMA + SUMS
LOSSES = {"divergence": 0, "cross_entropy": 1, "hinton": 2, "dkd": 3}
DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = {"batchmean": 0, "sum": 1, "none": 2}
TEACHER_INPUTS = {"logits": 0, "probs": 1, "logprobs": 2}

_F = ctypes.POINTER(ctypes.c_float)
_I = ctypes.POINTER(ctypes.c_int32)


class _Spec(ctypes.Structure):
    """``DstShardedSpec`` of ``include/distillation.h``."""

    _fields_ = [
        ("n", ctypes.c_size_t), ("c", ctypes.c_size_t), ("offset", ctypes.c_size_t),
        ("width", ctypes.c_size_t), ("loss", ctypes.c_int32), ("divergence", ctypes.c_int32),
        ("beta", ctypes.c_float), ("alpha", ctypes.c_float), ("temperature", ctypes.c_float),
        ("label_smoothing", ctypes.c_float), ("ignore_index", ctypes.c_int32),
        ("reduction", ctypes.c_int32), ("grad_scale", ctypes.c_float),
        ("teacher_input", ctypes.c_int32), ("ce_weight", ctypes.c_float),
        ("tckd_weight", ctypes.c_float), ("nckd_weight", ctypes.c_float),
    ]


_declared = False


def _h():
    global _declared
    h = _lib.lib()
    if not _declared:
        sp, p, i32, sz, f32 = ctypes.POINTER(_Spec), ctypes.c_void_p, ctypes.c_int32, ctypes.c_size_t, ctypes.c_float

        def sig(name, *args):
            f = getattr(h, name)
            f.restype = i32
            f.argtypes = list(args)

        sig("dst_fast_sharded_stats", i32, sp, p, p, p, p)
        sig("dst_fast_sharded_jsd_terms", i32, sp, p, p, p, p, p)
        sig("dst_fast_sharded_loss_and_grad", i32, sp, p, p, p, p, p, p, p, p, p)
        sig("dst_cuda_sharded_stats", p, sp, p, p, p, p)
        sig("dst_cuda_sharded_jsd_terms", p, sp, p, p, p, p, p)
        sig("dst_cuda_sharded_loss_and_grad", p, sp, p, p, p, p, p, p, p, p, p)
        sig("dst_sharded_rescale_stats", sz, f32, p, p)
        sig("dst_sharded_combine_stats", sz, sz, f32, p, p)
        _declared = True
    return h


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _f32(x: Tensor, name: str, device: Optional[torch.device] = None) -> Tensor:
    """``x`` as a contiguous float32 tensor on ``device`` (default: the CPU or a CUDA device)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if device is None and x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {x.device}: the sharded losses take CPU or CUDA tensors")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the student's shard on {device}")
    if x.dtype != torch.float32:
        raise ValueError(f"{name} has dtype {x.dtype}: the stats and JSD terms are float32")
    return x.detach().contiguous()


_HALF = (torch.bfloat16, torch.float16, torch.float64)


def _shard(x: Tensor, name: str, device: Optional[torch.device] = None) -> Tensor:
    """A shard's logits (or a given teacher) as float32: bfloat16, float16 and float64 tensors
    are converted (exactly for the halves; the math is float32 either way)."""
    if isinstance(x, Tensor) and not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}: logits must be floating point (float32, "
                         "bfloat16, float16 or float64)")
    if isinstance(x, Tensor) and x.dtype in _HALF:
        x = x.detach().float()
    x = _f32(x, name, device)
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, width] (the shard's columns), got {list(x.shape)}")
    return x


_I32_MIN, _I32_MAX = -(2 ** 31), 2 ** 31 - 1


def _labels(labels: Optional[Tensor], n: int, device: torch.device,
            ignore: int) -> Optional[Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int32, torch.int64) or labels.shape != (n,):
        raise ValueError(f"labels must be [{n}] int32 or int64 global classes, got "
                         f"{labels.dtype} {list(labels.shape)}")
    # An int64 label outside int32 stays out of range (an error) instead of wrapping to a valid
    # class or landing on ignore_index.
    return _int32(labels.detach(), ignore).to(device=device)


def _same_rows(t: Optional[Tensor], s: Tensor, name: str) -> None:
    """A teacher shard must have the student shard's shape (the C side reads ``[n, width]``)."""
    if t is not None and t.shape != s.shape:
        raise ValueError(f"{name} has shape {list(t.shape)} but the student's shard "
                         f"{list(s.shape)}: the teacher's shard covers the same rows and columns")


def _numel(x: Tensor, want: int, name: str, what: str) -> None:
    if x.numel() != want:
        raise ValueError(f"{name} has {x.numel()} elements, expected {want} ({what})")


def _call(kind: str, device: torch.device, *args) -> None:
    """``dst_fast_sharded_<kind>`` (CPU, threads first) or ``dst_cuda_sharded_<kind>`` (CUDA, a
    context on PyTorch's current stream first)."""
    h = _h()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(index).cuda_stream
        status = getattr(h, f"dst_cuda_sharded_{kind}")(_lib.cuda_context(index, stream), *args)
    else:
        status = getattr(h, f"dst_fast_sharded_{kind}")(torch.get_num_threads(), *args)
    _lib.check(status)


def _choice(value: str, table: dict, name: str) -> int:
    if value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
    return table[value]


class Config:
    """One sharded loss: ``loss`` ("hinton", "divergence", "cross_entropy" or "dkd"),
    ``divergence`` and ``beta`` (for "divergence"), ``alpha`` (Hinton), ``ce_weight``,
    ``tckd_weight``, ``nckd_weight`` (DKD: ``ce_weight CE + T^2 (tckd_weight TCKD + nckd_weight
    NCKD)``, the teacher as logits and detached), ``temperature``, ``label_smoothing``,
    ``ignore_index``, ``reduction`` ("batchmean", "sum" or "none": the sum's gradient),
    ``teacher_input`` ("logits", "probs" or "logprobs")."""

    def __init__(self, loss: str = "hinton", *, temperature: float = 1.0, alpha: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "batchmean",
                 teacher_input: str = "logits", ce_weight: float = 1.0, tckd_weight: float = 1.0,
                 nckd_weight: float = 8.0):
        self.loss = _choice(loss, LOSSES, "loss")
        self.divergence = _choice(divergence, DIVERGENCES, "divergence")
        self.reduction = _choice(reduction, REDUCTIONS, "reduction")
        self.teacher_input = _choice(teacher_input, TEACHER_INPUTS, "teacher_input")
        self.temperature = float(temperature)
        self.alpha, self.beta = float(alpha), float(beta)
        if not _I32_MIN <= int(ignore_index) <= _I32_MAX:
            raise ValueError(f"ignore_index = {ignore_index} must fit in int32")
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)
        self.ce_weight, self.tckd_weight = float(ce_weight), float(tckd_weight)
        self.nckd_weight = float(nckd_weight)

    @property
    def is_jsd(self) -> bool:
        return self.loss == 0 and self.divergence == 2

    def spec(self, n: int, classes: int, offset: int, width: int, grad_scale: float = 1.0):
        return _Spec(n, classes, offset, width, self.loss, self.divergence, self.beta, self.alpha,
                     self.temperature, self.label_smoothing, self.ignore_index, self.reduction,
                     grad_scale, self.teacher_input, self.ce_weight, self.tckd_weight,
                     self.nckd_weight)


def stats(cfg: Config, student: Tensor, teacher: Optional[Tensor], labels: Optional[Tensor],
          classes: int, offset: int) -> Tensor:
    """Phase 1: this shard's ``[N * STATS]`` float32 stats (maxima plane ``[N, 2]``, then sums
    plane ``[N, 9]``), relative to its own maxima."""
    s = _shard(student, "student")
    n, width = s.shape
    t = None if teacher is None else _shard(teacher, "teacher", s.device)
    _same_rows(t, s, "teacher")
    y = _labels(labels, n, s.device, cfg.ignore_index)
    out = torch.empty(n * STATS, dtype=torch.float32, device=s.device)
    spec = cfg.spec(n, classes, offset, width)
    _call("stats", s.device, ctypes.byref(spec), _ptr(s), _ptr(t), _ptr(y), _ptr(out))
    return out


def rescale_stats(stats_: Tensor, global_maxima: Tensor, temperature: float) -> None:
    """In place: this shard's sums rescaled to ``global_maxima`` (``[N * 2]``, the all-reduce MAX of
    every shard's maxima plane), which it also copies into the maxima plane. CUDA stats are
    rescaled on a host copy (``[N, 11]`` floats)."""
    if stats_.dtype != torch.float32 or not stats_.is_contiguous() or stats_.numel() % STATS:
        raise ValueError(f"stats must be a contiguous float32 [N * {STATS}] tensor")
    n = stats_.numel() // STATS
    host = stats_ if stats_.device.type == "cpu" else stats_.cpu()
    g = _f32(global_maxima, "global_maxima").cpu().contiguous()
    if g.numel() != n * MAXIMA:
        raise ValueError(f"global_maxima must have {n * MAXIMA} elements, got {g.numel()}")
    _lib.check(_h().dst_sharded_rescale_stats(n, temperature, _ptr(host), _ptr(g)))
    if host is not stats_:
        stats_.copy_(host)


def all_reduce_stats(stats_: Tensor, temperature: float, group=None) -> Tensor:
    """The distributed combine, in place: all-reduce MAX of the maxima plane, ``rescale_stats``,
    all-reduce SUM of the sums plane (two collectives). Returns ``stats_``."""
    import torch.distributed as dist

    n = stats_.numel() // STATS
    maxima = stats_[: n * MAXIMA].clone()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    rescale_stats(stats_, maxima, temperature)
    sums = stats_[n * MAXIMA:]  # a contiguous view: reduced in place
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return stats_


def combine_stats(shards: Sequence[Tensor], temperature: float) -> Tensor:
    """The in-process combine of every shard's stats (in shard order), on the first's device
    (combined on the host)."""
    device = shards[0].device if shards else torch.device("cpu")
    parts = [_f32(s, "stats").cpu().reshape(-1) for s in shards]
    if not parts or parts[0].numel() % STATS:
        raise ValueError(f"combine_stats needs at least one [N * {STATS}] stats tensor")
    n = parts[0].numel() // STATS
    if any(p.numel() != n * STATS for p in parts):
        raise ValueError("every shard's stats must cover the same rows")
    allp = torch.cat(parts)
    out = torch.empty(n * STATS, dtype=torch.float32)
    _lib.check(_h().dst_sharded_combine_stats(n, len(parts), temperature, _ptr(allp), _ptr(out)))
    return out.to(device)


def jsd_terms(cfg: Config, student: Tensor, teacher: Tensor, labels: Optional[Tensor],
              global_stats: Tensor, classes: int, offset: int) -> Tensor:
    """The JSD round: this shard's ``[N * 2]`` partial ``KL(q||M)``, ``KL(p||M)``, to be
    all-reduced SUM."""
    s = _shard(student, "student")
    t = _shard(teacher, "teacher", s.device)
    _same_rows(t, s, "teacher")
    n, width = s.shape
    y = _labels(labels, n, s.device, cfg.ignore_index)
    g = _f32(global_stats, "global_stats", s.device)
    _numel(g, n * STATS, "global_stats", f"[N * {STATS}], the combined stats")
    out = torch.empty(n * 2, dtype=torch.float32, device=s.device)
    spec = cfg.spec(n, classes, offset, width)
    _call("jsd_terms", s.device, ctypes.byref(spec), _ptr(s), _ptr(t), _ptr(y), _ptr(g),
          _ptr(out))
    return out


def loss_and_grad(cfg: Config, student: Tensor, teacher: Optional[Tensor],
                  labels: Optional[Tensor], global_stats: Tensor, classes: int, offset: int,
                  jsd: Optional[Tensor] = None, teacher_grad: bool = False):
    """Phase 2: ``(loss_part, row_loss_part, grad_student, grad_teacher or None)``: this shard's
    part of the reduced loss (the parts sum over the shards to the loss), of each row's loss, and
    its gradient columns."""
    s = _shard(student, "student")
    n, width = s.shape
    dev = s.device
    t = None if teacher is None else _shard(teacher, "teacher", dev)
    _same_rows(t, s, "teacher")
    y = _labels(labels, n, dev, cfg.ignore_index)
    g = _f32(global_stats, "global_stats", dev)
    _numel(g, n * STATS, "global_stats", f"[N * {STATS}], the combined stats")
    j = None if jsd is None else _f32(jsd, "jsd_terms", dev)
    if j is not None:
        _numel(j, n * 2, "jsd_terms", "[N * 2], the summed JSD terms")
    loss = torch.empty(1, dtype=torch.float32)  # host memory on both backends
    rows = torch.empty(n, dtype=torch.float32, device=dev)
    gs = torch.empty(n, width, dtype=torch.float32, device=dev)
    gt = (torch.empty(n, width, dtype=torch.float32, device=dev)
          if teacher_grad and t is not None else None)
    spec = cfg.spec(n, classes, offset, width)
    _call("loss_and_grad", dev, ctypes.byref(spec), _ptr(s), _ptr(t), _ptr(y), _ptr(g), _ptr(j),
          _ptr(loss), _ptr(rows), _ptr(gs), _ptr(gt))
    return loss[0].to(dev), rows, gs, gt


class _ShardedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, cfg, classes, offset, group, teacher_grad):
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        width = student.shape[-1] if student.dim() == 2 else None
        if not distributed and (offset != 0 or width != classes):
            raise ValueError(
                f"torch.distributed is not initialised, so this shard (offset {offset}, width "
                f"{width} of {classes} classes) would be the whole loss: pass every column "
                "(offset 0, width = classes), initialise torch.distributed, or combine the shards "
                "in one process with stats / combine_stats / loss_and_grad")
        st = stats(cfg, student, teacher, labels, classes, offset)
        if distributed:
            all_reduce_stats(st, cfg.temperature, group)
        jsd = None
        if cfg.is_jsd:
            jsd = jsd_terms(cfg, student, teacher, labels, st, classes, offset)
            if distributed:
                dist.all_reduce(jsd, op=dist.ReduceOp.SUM, group=group)
        loss, _, gs, gt = loss_and_grad(cfg, student, teacher, labels, st, classes, offset, jsd,
                                        teacher_grad)
        total = loss.reshape(1).clone()
        if distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(gs, gt if gt is not None else gs.new_empty(0))
        ctx.dtypes = (student.dtype, None if teacher is None else teacher.dtype)
        ctx.has_gt = gt is not None
        return total[0]

    @staticmethod
    def backward(ctx, upstream):
        gs, gt = ctx.saved_tensors
        # each gradient in its input's dtype, rounded once from float32
        ds, dt = ctx.dtypes
        return ((gs * upstream).to(ds), (gt * upstream).to(dt) if ctx.has_gt else None, None,
                None, None, None,
                None, None)


def sharded_kd_loss(student: Tensor, teacher: Optional[Tensor], labels: Optional[Tensor], *,
                    classes: int, offset: int, loss: str = "hinton", temperature: float = 1.0,
                    alpha: float = 0.5, divergence: str = "forward_kl", beta: float = 0.5,
                    label_smoothing: float = 0.0, ignore_index: int = -100,
                    reduction: str = "batchmean", teacher_input: str = "logits",
                    ce_weight: float = 1.0, tckd_weight: float = 1.0, nckd_weight: float = 8.0,
                    group=None) -> Tensor:
    """The whole loss on every rank (the shards' parts all-reduced), differentiable: the
    backward gives ``student`` (and ``teacher`` when it requires grad) this shard's columns of
    the unsharded gradient. With torch.distributed not initialised, one shard holding every
    column (``offset`` 0, ``width`` ``classes``) is the unsharded loss. ``teacher_input``:
    "logits", "probs" or "logprobs" (a given teacher gets no gradient). ``loss="dkd"``: decoupled
    KD with ``ce_weight``, ``tckd_weight``, ``nckd_weight`` (the teacher as logits, no gradient)."""
    cfg = Config(loss, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                 label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction,
                 teacher_input=teacher_input, ce_weight=ce_weight, tckd_weight=tckd_weight,
                 nckd_weight=nckd_weight)
    want_t = (teacher is not None and teacher.requires_grad and cfg.loss not in (1, 3)
              and cfg.teacher_input == 0)
    return _ShardedLoss.apply(student, teacher, labels, cfg, classes, offset, group, want_t)
