"""Sparse top-k teachers (``distillation.sparse_kd_loss``, ``SparseKDLoss``) against a float64
PyTorch composition (``log_softmax`` of the student, ``gather`` at the teacher's indices, the tail
as ``docs/LOSSES.md`` section 10 states it), values and gradients, on CPU tensors (the fast CPU
backend), and on CUDA tensors (the CUDA kernel; skipped without a GPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

import distillation as dl
from conftest import cuda_or_skip
from test_losses import close, grads, make


def topk_teacher(t, k, kind="logprobs"):
    """The teacher's top-k: int64 indices and its log-probabilities (or logits) there."""
    lq = F.log_softmax(t.double(), -1)
    vals, idx = lq.topk(k, -1)
    if kind == "logits":
        vals = t.double().gather(1, idx)
    return idx, vals.float()


def sparse_ref(s, idx, vals, T, divergence="forward_kl", beta=0.5, kind="logprobs",
               tail="renormalize", y=None, alpha=0.0, ls=0.0, ignore=-100,
               reduction="batchmean"):
    """``alpha CE + (1 - alpha) T^2 D(Q || P)`` per section 10, float64, PyTorch ops only."""
    s64, v = s.double(), vals.double()
    n, c = s.shape
    k = idx.shape[1]
    lp = F.log_softmax(s64 / T, -1)
    has_tail = tail != "renormalize" and k < c
    lq = F.log_softmax(v / T, -1)
    if has_tail:
        l1m = torch.logsumexp(v, -1, keepdim=True).clamp(max=0.0)
        lq = lq + l1m
        m = -torch.expm1(l1m)
    support = torch.zeros(n, c, dtype=torch.bool).scatter_(1, idx, True)
    if tail == "bucket" and has_tail:
        lp_s = lp.gather(1, idx)
        lp_tail = torch.logsumexp(lp.masked_fill(support, -math.inf), -1, keepdim=True)
        lP = torch.cat([lp_s, lp_tail], 1)
        lQ = torch.cat([lq, m.log()], 1)
    else:
        fill = (m / (c - k)).log() if (tail == "uniform" and has_tail) else -math.inf
        lQ = torch.full((n, c), 0.0, dtype=torch.float64) + fill
        lQ = lQ.scatter(1, idx, lq)
        lP = lp
    Q, P = lQ.exp(), lP.exp()
    if divergence == "forward_kl":
        d = (torch.xlogy(Q, Q) - Q * torch.where(Q > 0, lP, torch.zeros_like(lP))).sum(-1)
    elif divergence == "reverse_kl":
        d = (P * (lP - lQ)).sum(-1)
    else:
        lM = torch.logaddexp(lQ + math.log(beta), lP + math.log(1 - beta))
        d = (beta * (torch.xlogy(Q, Q) - Q * torch.where(Q > 0, lM, torch.zeros_like(lM)))
             + (1 - beta) * P * (lP - lM)).sum(-1)
    rows = (1 - alpha) * T * T * d
    keep = torch.ones(n, dtype=torch.float64) if y is None else (y != ignore).double()
    if alpha > 0:
        target = torch.where(y != ignore, y, torch.zeros_like(y))
        rows = rows + alpha * F.cross_entropy(s64, target, label_smoothing=ls, reduction="none")
    rows = rows * keep
    return {"batchmean": rows.sum() / keep.sum(), "sum": rows.sum(), "none": rows}[reduction]


CASES = [
    # (divergence, tail, kind, k, alpha)
    ("forward_kl", "renormalize", "logprobs", 4, 0.0),
    ("forward_kl", "renormalize", "logits", 4, 0.0),
    ("forward_kl", "bucket", "logprobs", 4, 0.3),
    ("forward_kl", "uniform", "logprobs", 1, 0.0),
    ("reverse_kl", "bucket", "logprobs", 5, 0.0),
    ("reverse_kl", "uniform", "logprobs", 3, 0.5),
    ("jsd", "renormalize", "logprobs", 2, 0.0),
    ("jsd", "bucket", "logprobs", 6, 0.2),
    ("jsd", "uniform", "logprobs", 4, 0.0),
    ("forward_kl", "renormalize", "logprobs", 13, 0.0),  # k = C
]


@pytest.mark.parametrize("div,tail,kind,k,alpha", CASES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_against_the_float64_composition(div, tail, kind, k, alpha, T):
    s, t, y = make(9, 13, seed=k + int(T))
    y[2] = -100
    idx, vals = topk_teacher(t, k, kind)
    kw = dict(divergence=div, beta=0.3, values_kind=kind, tail=tail, labels=y, alpha=alpha,
              label_smoothing=0.1 if alpha else 0.0)
    got, (gs,) = grads(lambda s: dl.sparse_kd_loss(s, idx, vals, T, **kw), s)
    want, (ws,) = grads(lambda s: sparse_ref(s, idx, vals, T, div, 0.3, kind, tail, y, alpha,
                                             0.1 if alpha else 0.0), s)
    close(got, want)
    close(gs, ws)


@pytest.mark.parametrize("div,tail,kind,k,alpha", CASES)
def test_cuda_against_the_float64_composition(div, tail, kind, k, alpha):
    cuda_or_skip()
    T = 2.5
    s, t, y = make(9, 13, seed=k)
    y[2] = -100
    idx, vals = topk_teacher(t, k, kind)
    kw = dict(divergence=div, beta=0.3, values_kind=kind, tail=tail, labels=y.cuda(),
              alpha=alpha, label_smoothing=0.1 if alpha else 0.0)
    got, (gs,) = grads(lambda s: dl.sparse_kd_loss(s, idx.cuda(), vals.cuda(), T, **kw),
                       s.cuda())
    want, (ws,) = grads(lambda s: sparse_ref(s, idx, vals, T, div, 0.3, kind, tail, y, alpha,
                                             0.1 if alpha else 0.0), s)
    assert gs.is_cuda
    close(got, want)
    close(gs, ws)
    # bf16 on the device: the gradient in bf16, within its rounding.
    sb, vb = s.cuda().bfloat16(), vals.cuda().bfloat16()
    got, (gb,) = grads(lambda s: dl.sparse_kd_loss(s, idx.cuda(), vb, T, **kw), sb)
    want, (wb,) = grads(lambda s: sparse_ref(s, idx, vb.float().cpu(), T, div, 0.3, kind, tail,
                                             y, alpha, 0.1 if alpha else 0.0),
                        sb.float().cpu())
    assert gb.dtype == torch.bfloat16
    close(got, want, atol=1e-4)
    assert (gb.double().cpu() - wb).norm() <= 1e-2 * wb.norm()


def test_module_reduction_none_and_bf16():
    s, t, y = make(7, 40, seed=3)
    idx, vals = topk_teacher(t, 8)
    m = dl.SparseKDLoss(temperature=2.0, tail="bucket", reduction="none")
    got, (gs,) = grads(lambda s: m(s, idx, vals), s)
    want, (ws,) = grads(lambda s: sparse_ref(s, idx, vals, 2.0, tail="bucket",
                                             reduction="none"), s)
    close(got, want)
    close(gs, ws)
    # bf16 student and values: the gradient in bf16, within its rounding.
    sb, vb = s.bfloat16(), vals.bfloat16()
    got, (gb,) = grads(lambda s: m(s, idx, vb), sb)
    want, (wb,) = grads(lambda s: sparse_ref(s, idx, vb.float(), 2.0, tail="bucket",
                                             reduction="none"), sb.float())
    assert gb.dtype == torch.bfloat16
    close(got, want, atol=1e-4)
    assert (gb.double() - wb).norm() <= 1e-2 * wb.norm()


def test_compiles_without_graph_breaks():
    s, t, _ = make(5, 17, seed=1)
    idx, vals = topk_teacher(t, 3)
    f = torch.compile(lambda s: dl.sparse_kd_loss(s, idx, vals, 2.0, tail="uniform"),
                      fullgraph=True)
    got, (gs,) = grads(f, s)
    want, (ws,) = grads(lambda s: sparse_ref(s, idx, vals, 2.0, tail="uniform"), s)
    close(got, want)
    close(gs, ws)


def test_errors():
    s, t, y = make(4, 10)
    idx, vals = topk_teacher(t, 3)
    dup = idx.clone()
    dup[1, 1] = dup[1, 0]
    with pytest.raises(dl.DistillationError, match="appears twice"):
        dl.sparse_kd_loss(s, dup, vals)
    bad = idx.clone()
    bad[0, 0] = 10
    with pytest.raises(dl.DistillationError, match="not in 0..10"):
        dl.sparse_kd_loss(s, bad, vals)
    with pytest.raises(dl.DistillationError, match="labels"):
        dl.sparse_kd_loss(s, idx, vals, alpha=0.5)
    with pytest.raises(dl.DistillationError, match="log-probabilities"):
        dl.sparse_kd_loss(s, idx, vals, values_kind="logits", tail="bucket")
    with pytest.raises(ValueError, match="tail"):
        dl.sparse_kd_loss(s, idx, vals, tail="spread")
    with pytest.raises(ValueError, match="indices"):
        dl.sparse_kd_loss(s, idx[:2], vals[:2])
    # k = 0: the library's message, not torch's reshape error; values not a tensor: TypeError.
    with pytest.raises(ValueError, match="k = 0"):
        dl.sparse_kd_loss(s, idx[:, :0], vals[:, :0])
    with pytest.raises(TypeError, match="values"):
        dl.sparse_kd_loss(s, idx, vals.tolist())
    # Reverse KL with a probability of 0 on the support is +inf: an error on CPU tensors.
    zero = vals.clone()
    zero[2, 1] = float("-inf")
    with pytest.raises(dl.DistillationError, match="reverse KL"):
        dl.sparse_kd_loss(s, idx, zero, divergence="reverse_kl", tail="bucket")
