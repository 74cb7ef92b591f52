"""DKD (``distillation.dkd_loss``, ``DKDLoss``) against mdistiller's composition of DKD in float64
PyTorch (values and gradients), on CPU tensors (the fast CPU backend) and, on a GPU machine, CUDA
tensors (the CUDA backend)."""

import pytest
import torch
import torch.nn.functional as F

import distillation as dl
from test_losses import DEVICES, close, device_or_skip, grads, make


def dkd_ref(s, t, y, T, alpha, beta, ce_weight=1.0, warmup=1.0, ls=0.0, ignore=-100,
            reduction="batchmean"):
    """mdistiller's ``dkd_loss`` (cat_mask of the target / non-target mass, the non-target
    softmax by subtracting 1000 at the target) per row in float64, plus the weighted CE."""
    s64, t64 = s.double(), t.double()
    keep = y != ignore
    target = torch.where(keep, y, torch.zeros_like(y))
    gt = F.one_hot(target, s.shape[-1]).bool()
    ps, pt = F.softmax(s64 / T, 1), F.softmax(t64 / T, 1)

    def binary(p):
        return torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)

    bs, bt = binary(ps), binary(pt)
    tckd = F.kl_div(bs.log(), bt, reduction="none").sum(1)
    nckd = F.kl_div(F.log_softmax(s64 / T - 1000.0 * gt, 1), F.softmax(t64 / T - 1000.0 * gt, 1),
                    reduction="none").sum(1)
    ce = F.cross_entropy(s64, target, label_smoothing=ls, reduction="none")
    rows = (ce_weight * ce + warmup * T * T * (alpha * tckd + beta * nckd)) * keep.double()
    return {"batchmean": rows.sum() / keep.sum(), "sum": rows.sum(), "none": rows}[reduction]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,alpha,beta,ce_weight,warmup,ls", [
    (4.0, 1.0, 8.0, 1.0, 1.0, 0.0),   # the paper's
    (4.0, 1.0, 8.0, 1.0, 0.35, 0.1),  # during the warm-up, with label smoothing
    (1.0, 0.5, 2.0, 0.0, 1.0, 0.0),   # the KD terms alone
    (8.0, 0.0, 1.0, 0.3, 1.0, 0.0),   # NCKD alone (and some CE)
    (2.0, 2.0, 0.0, 0.0, 1.0, 0.0),   # TCKD alone
])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_dkd_matches_mdistiller(device, T, alpha, beta, ce_weight, warmup, ls, reduction):
    device_or_skip(device)
    s, t, y = make(seed=20, device=device)
    y[2] = -100

    def ours_fn(a, b):
        return dl.dkd_loss(a, b, y, T, alpha, beta, ce_weight=ce_weight, warmup=warmup,
                           label_smoothing=ls, reduction=reduction)

    def ref_fn(a, b):
        return dkd_ref(a, b, y, T, alpha, beta, ce_weight, warmup, ls, reduction=reduction)

    ours, (gs, gt) = grads(ours_fn, s, t)
    want, (rs, _) = grads(ref_fn, s, t)
    close(ours, want)
    close(gs, rs)
    assert gt is None  # DKD's teacher is detached


def test_dkd_module_warmup_and_leading_dims():
    g = torch.Generator().manual_seed(21)
    s, t = torch.randn(2, 3, 11, generator=g) * 2, torch.randn(2, 3, 11, generator=g) * 2
    y = torch.randint(0, 11, (2, 3), generator=g)
    loss = dl.DKDLoss(temperature=4.0, alpha=1.0, beta=8.0, warmup_epochs=20)
    flat = (s.reshape(6, 11), t.reshape(6, 11), y.reshape(6))
    # mdistiller's warm-up: min(epoch / warmup, 1), epochs from 1; no epoch: the full weight.
    close(loss(s, t, y, epoch=5), dkd_ref(*flat, 4.0, 1.0, 8.0, warmup=0.25))
    close(loss(s, t, y, epoch=40), dkd_ref(*flat, 4.0, 1.0, 8.0))
    close(loss(s, t, y), dkd_ref(*flat, 4.0, 1.0, 8.0))
    rows = dl.DKDLoss(reduction="none")(s, t, y)
    assert rows.shape == (2, 3)


def test_dkd_gradcheck_and_opcheck():
    s, t, y = make(n=4, c=5, seed=22, scale=1.0)
    a = s.double().requires_grad_()
    kw = dict(eps=1e-3, atol=1e-3, rtol=1e-3)
    assert torch.autograd.gradcheck(lambda x: dl.dkd_loss(x, t, y, 2.0, 1.0, 2.0), (a,), **kw)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.distillation.dkd.default,
                          (s, t, y.to(torch.int32), 4.0, 1.0, 1.0, 8.0, 0.0, -100, 0, False, True))


def test_dkd_compiles_without_graph_break():
    def step(a, b, labels):
        return dl.dkd_loss(a, b, labels, 4.0, 1.0, 8.0, warmup=0.5)

    g = torch.Generator().manual_seed(23)
    s, t = torch.randn(6, 17, generator=g), torch.randn(6, 17, generator=g)
    y = torch.randint(0, 17, (6,), generator=g)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    eager = step(a, t, y)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(b, t, y)
    compiled.backward()
    assert torch.allclose(eager, compiled) and torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("call,words", [
    (lambda s, t, y: dl.dkd_loss(s[:, :1], t[:, :1], y * 0), "at least 2 classes"),
    (lambda s, t, y: dl.dkd_loss(s, t, y, beta=-1.0), "nckd_weight"),
    (lambda s, t, y: dl.dkd_loss(s, t, y, temperature=0.0), "temperature"),
    (lambda s, t, y: dl.dkd_loss(s, t, y * 0 + 99), "label"),
])
def test_dkd_bad_input_raises_with_the_message(call, words):
    s, t, y = make(seed=24)
    with pytest.raises(dl.DistillationError) as info:
        call(s, t, y)
    assert words.lower() in str(info.value).lower(), str(info.value)
