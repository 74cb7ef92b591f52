"""The fused linear layer + distillation loss (``distillation.fused_linear_kd_loss``,
``FusedLinearKDLoss``; ``docs/LOSSES.md`` section 11) against a float64 PyTorch composition
(``logits = h @ W.T + b``, ``log_softmax``, ``kl_div * T^2`` / the divergences written out,
``cross_entropy``): the loss and the gradients of the hidden states, the weight and the bias,
for the Hinton and the Liger weightings (Liger's objective written out: ``weight_hard * CE +
weight_soft * JSD_beta``, no ``T^2``), a padded teacher vocabulary, ignored rows, chunking,
bf16 / f16 within the half-precision budget, torch.compile, gradcheck, and bad inputs. CPU
tensors run the fast CPU backend; the CUDA test runs on a GPU machine."""

import pytest
import torch
import torch.nn.functional as F

import distillation as dl
from conftest import cuda_or_skip


def make(n=7, h=6, v=11, ht=5, vt=None, seed=0, mask=(1, 4), dtype=torch.float32):
    """Student and teacher layers: hidden states, weight, bias for each; int64 labels with the
    rows ``mask`` ignored."""
    g = torch.Generator().manual_seed(seed)
    vt = v if vt is None else vt
    xs = [torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * (2 / h ** 0.5),
          torch.randn(v, generator=g) * 0.5, torch.randn(n, ht, generator=g),
          torch.randn(vt, ht, generator=g) * (3 / ht ** 0.5), torch.randn(vt, generator=g) * 0.5]
    y = torch.randint(0, v, (n,), generator=g)
    y[list(mask)] = -100
    return [x.to(dtype) for x in xs] + [y]


def reference(h, w, b, th, tw, tb, y, *, temperature=1.0, alpha=0.5, divergence="forward_kl",
              beta=0.5, weighting="hinton", weight_hard=0.5, weight_soft=0.5,
              label_smoothing=0.0, ignore_index=-100, reduction="batchmean",
              teacher_logits=None):
    """The unfused objective in float64: (loss, grad_h, grad_w, grad_b)."""
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    s = h @ w.T + (0 if b is None else b)
    v = w.shape[0]
    if teacher_logits is not None:
        t = teacher_logits.double()
    else:
        t = (th.double() @ tw.double().T + (0 if tb is None else tb.double()))[:, :v]
    T = temperature
    valid = y != ignore_index
    nv = max(int(valid.sum()), 1) if reduction == "batchmean" else 1
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         reduction="sum")
    lp, lq = F.log_softmax(s / T, -1)[valid], F.log_softmax(t / T, -1)[valid]
    if divergence == "forward_kl":
        d = F.kl_div(lp, lq, reduction="sum", log_target=True)
    elif divergence == "reverse_kl":
        d = F.kl_div(lq, lp, reduction="sum", log_target=True)
    else:
        p, q = lp.exp(), lq.exp()
        lm = (beta * q + (1 - beta) * p).log()
        d = beta * (q * (lq - lm)).sum() + (1 - beta) * (p * (lp - lm)).sum()
    if weighting == "hinton":
        loss = (alpha * ce + (1 - alpha) * T * T * d) / nv
    else:  # Liger / TRL: weight_hard * CE + weight_soft * D, no T^2
        loss = (weight_hard * ce + weight_soft * d) / nv
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return loss.detach(), grads


def ours(h, w, b, th, tw, tb, y, **kw):
    """The fused op on leaf copies: (loss, [grad_h, grad_w, grad_b])."""
    leaves = [x.clone().requires_grad_() for x in (h, w, b) if x is not None]
    hb, wb = leaves[0], leaves[1]
    bb = leaves[2] if b is not None else None
    loss = dl.fused_linear_kd_loss(hb, wb, th, tw, y, student_bias=bb, teacher_bias=tb, **kw)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def check(got, want, rtol=1e-4, atol=1e-6):
    (gl, gg), (wl, wg) = got, want
    torch.testing.assert_close(gl.double(), wl.double(), rtol=rtol, atol=atol)
    assert len(gg) == len(wg)
    for a, e in zip(gg, wg):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol)


CASES = [
    dict(temperature=2.0, alpha=0.3),
    dict(temperature=3.0, alpha=0.0),
    dict(temperature=1.5, alpha=0.6, divergence="reverse_kl", label_smoothing=0.1),
    dict(temperature=2.0, alpha=0.2, divergence="jsd", beta=0.3, reduction="sum"),
    dict(temperature=1.0, weighting="liger", divergence="jsd", beta=0.5, weight_hard=0.4,
         weight_soft=0.6),
    dict(temperature=2.5, weighting="liger", divergence="jsd", beta=0.2, weight_hard=1.0,
         weight_soft=2.0),
    dict(temperature=4.0, weighting="liger", weight_hard=0.0, weight_soft=1.0),
    dict(temperature=2.0, alpha=0.3, chunk_rows=3),
    dict(temperature=2.0, weighting="liger", divergence="reverse_kl", memory_budget=1),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_torch_composition(kw, bias):
    h, w, b, th, tw, tb, y = make(seed=len(str(kw)))
    if not bias:
        b = tb = None
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_rows", "memory_budget")}
    check(ours(h, w, b, th, tw, tb, y, **kw), reference(h, w, b, th, tw, tb, y, **ref_kw))


@pytest.mark.parametrize("weighting", ["hinton", "liger"])
def test_padded_teacher_vocab_is_cut_to_the_student(weighting):
    # V_t = V + 5 (a teacher head padded past the student's vocabulary): its columns past V are
    # dropped before the teacher's softmax.
    h, w, b, th, tw, tb, y = make(v=9, vt=14, ht=8, seed=3)
    kw = dict(temperature=2.0, alpha=0.4, divergence="jsd", beta=0.4, weighting=weighting,
              weight_hard=0.3, weight_soft=0.7)
    check(ours(h, w, b, th, tw, tb, y, **kw), reference(h, w, b, th, tw, tb, y, **kw))


def test_teacher_as_logits_and_cross_entropy_only():
    h, w, b, th, tw, tb, y = make(seed=4)
    t = torch.randn(h.shape[0], w.shape[0], generator=torch.Generator().manual_seed(5)) * 3
    kw = dict(temperature=2.0, alpha=0.3)
    got = ours(h, w, b, None, None, None, y, teacher_logits=t, **kw)
    check(got, reference(h, w, b, None, None, None, y, teacher_logits=t, **kw))
    # alpha = 1: fused linear cross-entropy, no teacher.
    got = ours(h, w, b, None, None, None, y, alpha=1.0)
    check(got, reference(h, w, b, th, tw, tb, y, alpha=1.0))


def test_ignored_rows_and_all_rows_ignored():
    h, w, b, th, tw, tb, y = make(n=9, mask=(0, 2, 3, 8), seed=6)
    kw = dict(temperature=2.0, alpha=0.5, divergence="jsd", beta=0.5)
    check(ours(h, w, b, th, tw, tb, y, **kw), reference(h, w, b, th, tw, tb, y, **kw))
    y[:] = -100
    loss, grads = ours(h, w, b, th, tw, tb, y, **kw)
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_upstream_gradient_scales_and_chunking_is_exact_in_order():
    h, w, b, th, tw, tb, y = make(n=10, seed=7)
    kw = dict(temperature=2.0, alpha=0.3)
    a, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    (3.0 * dl.fused_linear_kd_loss(a, wa, th, tw, y, **kw)).backward()
    _, (gh, gw) = ours(h, w, None, th, tw, None, y, **kw)
    torch.testing.assert_close(a.grad, 3.0 * gh, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(wa.grad, 3.0 * gw, rtol=1e-6, atol=1e-7)
    one = ours(h, w, None, th, tw, None, y, chunk_rows=1, **kw)
    check(one, ours(h, w, None, th, tw, None, y, **kw), rtol=1e-5, atol=1e-7)


def test_module_takes_ligers_call_order():
    h, w, b, th, tw, tb, y = make(v=9, vt=12, seed=8)
    loss_fn = dl.FusedLinearKDLoss(weighting="liger", divergence="jsd", beta=0.3,
                                   temperature=1.5, weight_hard=0.4, weight_soft=0.6)
    hb = h.clone().requires_grad_()
    loss = loss_fn(hb, w, th, tw, y)
    want, _ = reference(h, w, None, th, tw, None, y, weighting="liger", divergence="jsd",
                        beta=0.3, temperature=1.5, weight_hard=0.4, weight_soft=0.6)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert hb.grad is not None and hb.grad.shape == h.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_the_budget(dtype):
    h, w, b, th, tw, tb, y = make(n=12, h=16, v=40, ht=8, vt=43, seed=9, dtype=dtype)
    kw = dict(temperature=2.0, alpha=0.4, divergence="jsd", beta=0.4)
    (gl, grads) = ours(h, w, b, th, tw, tb, y, **kw)
    (wl, want) = reference(h, w, b, th, tw, tb, y, **kw)
    torch.testing.assert_close(gl.double(), wl, rtol=1e-4, atol=1e-6)
    for g, e, x in zip(grads, want, (h, w, b)):
        assert g.dtype == dtype and g.shape == x.shape
        # Rounded once from f32: the norm of the error within 1.5x that of rounding the exact
        # gradient once (docs/LOSSES.md, half precision), plus a hair for f32.
        r = (e.to(dtype).double() - e).norm()
        assert (g.double() - e).norm() <= 1.5 * r + 1e-6 * e.norm(), (g, e)


def test_torch_compile_fullgraph_matches_eager():
    h, w, b, th, tw, tb, y = make(seed=10)

    def step(a, wa, ba):
        return dl.fused_linear_kd_loss(a, wa, th, tw, y, student_bias=ba, teacher_bias=tb,
                                       temperature=2.0, alpha=0.3, divergence="jsd", beta=0.5)

    eager_in = [x.clone().requires_grad_() for x in (h, w, b)]
    comp_in = [x.clone().requires_grad_() for x in (h, w, b)]
    eager = step(*eager_in)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*comp_in)
    compiled.backward()
    assert torch.equal(eager, compiled)
    for a, c in zip(eager_in, comp_in):
        assert torch.equal(a.grad, c.grad)
    explain = torch._dynamo.explain(step)(*[x.clone().requires_grad_() for x in (h, w, b)])
    assert explain.graph_break_count == 0, explain.break_reasons


def test_gradcheck_and_opcheck():
    # The library computes in float32: gradcheck on float64 inputs with a step and tolerances
    # float32 rounding allows (as the other ops' gradchecks).
    h, w, b, th, tw, tb, y = make(n=4, h=3, v=5, ht=3, mask=(1,), seed=11)
    args = [x.double().requires_grad_() for x in (h, w, b)]
    kw = dict(eps=1e-3, atol=1e-3, rtol=1e-3)
    assert torch.autograd.gradcheck(
        lambda a, wa, ba: dl.fused_linear_kd_loss(a, wa, th, tw, y, student_bias=ba,
                                                  temperature=2.0, alpha=0.3, divergence="jsd"),
        args, **kw)
    torch.library.opcheck(
        torch.ops.distillation.fused_linear_kd.default,
        (h.requires_grad_(), w, b, th, tw, tb, None, y.to(torch.int32), 2.0, 0, 0.5, 0, 0.3, 0.5,
         0.5, 0.0, -100, 0, 0, 0, True, False, False))


def test_bad_inputs_raise_with_the_librarys_message():
    h, w, b, th, tw, tb, y = make(seed=12)
    err = dl.DistillationError
    with pytest.raises(err, match="alpha"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, alpha=1.5)
    with pytest.raises(err, match="beta"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, divergence="jsd", beta=0.0)
    with pytest.raises(err, match="weight_hard and weight_soft are both 0"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, weighting="liger", weight_hard=0.0,
                                weight_soft=0.0)
    with pytest.raises(err, match="teacher_vocab"):
        dl.fused_linear_kd_loss(h, w, th, tw[:-2], y)
    bad = y.clone()
    bad[0] = w.shape[0]
    with pytest.raises(err, match="label"):
        dl.fused_linear_kd_loss(h, w, th, tw, bad)
    with pytest.raises(err, match="temperature"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, temperature=0.0)
    with pytest.raises(err, match="no teacher"):
        dl.fused_linear_kd_loss(h, w, None, None, y, alpha=0.5)
    with pytest.raises(err, match="labels is NULL"):
        dl.fused_linear_kd_loss(h, w, th, tw, None, alpha=0.5)
    # Shapes are checked before the call (the library trusts the sizes it is given).
    with pytest.raises(ValueError, match="hidden size"):
        dl.fused_linear_kd_loss(h[:, :-1], w, th, tw, y)
    with pytest.raises(ValueError, match="rows"):
        dl.fused_linear_kd_loss(h, w, th[:-1], tw, y)
    with pytest.raises(ValueError, match="reduction"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, reduction="none")
    with pytest.raises(ValueError, match="weighting"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, weighting="trl")
    # Liger weights past 1e6, an upstream scale that would overflow.
    with pytest.raises(err, match="weight_hard"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, weighting="liger", weight_hard=3e38)
    # A teacher bias beside teacher logits would be ignored: refused, as in the C ABI.
    tl = (th @ tw.T)[:, :w.shape[0]]
    with pytest.raises(ValueError, match="teacher_bias"):
        dl.fused_linear_kd_loss(h, w, None, None, y, teacher_logits=tl, teacher_bias=tb)
    # A teacher that is not a tensor: a TypeError naming it (not an AttributeError).
    with pytest.raises(TypeError, match="teacher_logits"):
        dl.fused_linear_kd_loss(h, w, None, None, y, teacher_logits=tl.tolist())
    with pytest.raises(TypeError, match="teacher_hidden"):
        dl.fused_linear_kd_loss(h, w, th.tolist(), tw, y)
    # An int64 label past int32 is out of range even where ignore_index is int32's maximum (the
    # clamp must not land on it and mask the row).
    ok = y.clone()
    ok[ok < 0] = 0
    for label, ignore in ((2 ** 40, 2 ** 31 - 1), (-(2 ** 40), -(2 ** 31))):
        big = ok.clone()
        big[0] = label
        with pytest.raises(err, match="label"):
            dl.fused_linear_kd_loss(h, w, th, tw, big, ignore_index=ignore)
    # Narrow integer labels are class indices too.
    a = dl.fused_linear_kd_loss(h, w, th, tw, ok)
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(dl.fused_linear_kd_loss(h, w, th, tw, ok.to(dt)), a), dt


def test_cuda_matches_cpu():
    cuda_or_skip()
    h, w, b, th, tw, tb, y = make(n=33, h=24, v=70, ht=16, vt=75, seed=13)
    kw = dict(temperature=2.0, alpha=0.3, divergence="jsd", beta=0.4, chunk_rows=8)
    cpu = ours(h, w, b, th, tw, tb, y, **kw)
    cuda = ours(*[x.cuda() for x in (h, w, b, th, tw, tb, y)], **kw)
    check((cuda[0].cpu(), [g.cpu() for g in cuda[1]]), (cpu[0].double(),
                                                         [g.double() for g in cpu[1]]))


SPARSE_CASES = [
    # (divergence, tail, kind, k, alpha, chunk_rows)
    ("forward_kl", "renormalize", "logprobs", 4, 0.3, None),
    ("forward_kl", "renormalize", "logits", 11, 0.0, 2),  # k = V
    ("reverse_kl", "bucket", "logprobs", 5, 0.2, 3),
    ("jsd", "uniform", "logprobs", 3, 0.5, None),
    ("jsd", "bucket", "logprobs", 1, 0.0, 1),
]


@pytest.mark.parametrize("div,tail,kind,k,alpha,chunk_rows", SPARSE_CASES)
def test_sparse_topk_teacher_matches_the_torch_composition(div, tail, kind, k, alpha, chunk_rows):
    """``teacher_topk=(indices, values)``: the loss of ``sparse_kd_loss``'s float64 composition on
    the materialised logits ``h @ W.T + b`` (``test_sparse.sparse_ref``), and its gradients for
    the hidden states, the weight and the bias."""
    from test_sparse import sparse_ref, topk_teacher

    h, w, b, th, tw, tb, y = make(seed=20 + k)
    t = (th.double() @ tw.double().T + tb.double()).float()
    idx, vals = topk_teacher(t, k, kind)
    T, ls = 2.0, 0.1 if alpha else 0.0
    leaves = [x.double().requires_grad_() for x in (h, w, b)]
    s = leaves[0] @ leaves[1].T + leaves[2]
    want = sparse_ref(s, idx, vals, T, div, 0.3, kind, tail, y, alpha, ls)
    want_grads = torch.autograd.grad(want, leaves)
    got = ours(h, w, b, None, None, None, y, teacher_topk=(idx, vals), topk_values=kind,
               tail=tail, temperature=T, alpha=alpha, divergence=div, beta=0.3,
               label_smoothing=ls, chunk_rows=chunk_rows)
    check(got, (want.detach(), want_grads))


def test_sparse_topk_teacher_errors():
    h, w, b, th, tw, tb, y = make(seed=1)
    idx = torch.tensor([[0, 1, 2]] * h.shape[0])
    vals = torch.log_softmax(torch.randn(h.shape[0], 3), -1)
    bad = idx.clone()
    bad[2, 1] = bad[2, 0]
    with pytest.raises(Exception, match="row 2"):
        dl.fused_linear_kd_loss(h, w, None, None, y, teacher_topk=(bad, vals))
    with pytest.raises(ValueError, match="one form"):
        dl.fused_linear_kd_loss(h, w, th, tw, y, teacher_topk=(idx, vals))
    with pytest.raises(ValueError, match="tail"):
        dl.fused_linear_kd_loss(h, w, None, None, y, teacher_topk=(idx, vals), tail="none")
    with pytest.raises(ValueError, match="indices' shape"):
        dl.fused_linear_kd_loss(h, w, None, None, y, teacher_topk=(idx, vals[:, :2]))
