"""The package's losses against PyTorch's own composition in float64 (values and gradients), on
CPU tensors (the fast CPU backend) and, on a GPU machine, CUDA tensors (the CUDA backend)."""

import math

import pytest
import torch
import torch.nn.functional as F

import distillation as dl
from conftest import cuda_or_skip

ATOL = 2e-5


def make(n=9, c=13, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * scale).to(device)
    t = (torch.randn(n, c, generator=g) * scale).to(device)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    return s, t, y


def kl_ref(s, t, T, divergence="forward_kl", beta=0.5, teacher_input="logits", mask=None):
    """T^2 * D per row, in float64, PyTorch ops only."""
    s, t = s.double(), t.double()
    lp = F.log_softmax(s / T, -1)
    lq = {"logits": lambda: F.log_softmax(t / T, -1), "probs": lambda: t.log(),
          "logprobs": lambda: t}[teacher_input]()
    if divergence == "forward_kl":
        d = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":
        d = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lq + math.log(beta), lp + math.log(1 - beta)]), 0)
        d = (beta * F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1)
             + (1 - beta) * F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1))
    d = T * T * d
    return d if mask is None else d * mask


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out.sum().backward() if out.dim() else out.backward()
    return out.detach(), [x.grad for x in xs]


def close(a, b, atol=ATOL):
    assert torch.allclose(a.double().cpu(), b.double().cpu(), atol=atol, rtol=1e-4), (a, b)


DEVICES = ["cpu", "cuda"]


def device_or_skip(device):
    if device == "cuda":
        cuda_or_skip()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,alpha,ls", [(1.0, 0.5, 0.0), (4.0, 0.2, 0.1), (0.5, 0.9, 0.0)])
def test_kd_loss_matches_pytorch(device, T, alpha, ls):
    device_or_skip(device)
    s, t, y = make(device=device)
    y[2] = -100
    ours, (gs, gt) = grads(lambda a, b: dl.kd_loss(a, b, y, T, alpha, label_smoothing=ls), s, t)
    mask = (y != -100).double()

    def ref(a, b):
        ce = F.cross_entropy(a.double(), y, label_smoothing=ls)
        kl = kl_ref(a, b, T, mask=mask).sum() / mask.sum()
        return alpha * ce + (1 - alpha) * kl

    want, (rs, rt) = grads(ref, s, t)
    close(ours, want)
    close(gs, rs)
    close(gt, rt)  # the teacher's gradient (online distillation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_input", ["logits", "probs", "logprobs"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_soft_target_loss_matches_pytorch(device, divergence, teacher_input, reduction):
    device_or_skip(device)
    s, t, y = make(seed=1, device=device)
    T = 2.5
    if teacher_input == "probs":
        t = torch.softmax(t, -1)
    elif teacher_input == "logprobs":
        t = torch.log_softmax(t, -1)
    y[0] = y[5] = -100
    mask = (y != -100).double()

    def ours_fn(a, b):
        return dl.soft_target_loss(a, b, T, divergence=divergence, beta=0.3,
                                   teacher_input=teacher_input, labels=y, reduction=reduction)

    def ref_fn(a, b):
        rows = kl_ref(a, b, T, divergence, 0.3, teacher_input, mask)
        return {"batchmean": rows.sum() / mask.sum(), "sum": rows.sum(), "none": rows}[reduction]

    ours, (gs, gt) = grads(ours_fn, s, t)
    want, (rs, rt) = grads(ref_fn, s, t)
    close(ours, want)
    close(gs, rs)
    if teacher_input == "logits":
        close(gt, rt)
    else:
        assert gt is None  # no teacher gradient through given probabilities


def test_scale_t2_false_is_trl_and_liger_convention():
    s, t, _ = make(seed=2)
    T = 3.0
    ours = dl.soft_target_loss(s, t, T, divergence="jsd", beta=0.5, scale_t2=False)
    close(ours, kl_ref(s, t, T, "jsd", 0.5).mean() / (T * T))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ls,ignore", [(0.0, -100), (0.2, -100), (0.1, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_pytorch(device, ls, ignore, reduction):
    device_or_skip(device)
    s, _, y = make(seed=3, device=device)
    y[1] = ignore
    ours, (g,) = grads(lambda a: dl.cross_entropy(a, y, label_smoothing=ls, ignore_index=ignore,
                                                  reduction=reduction), s)
    want, (r,) = grads(lambda a: F.cross_entropy(a.double(), y, label_smoothing=ls,
                                                 ignore_index=ignore, reduction=reduction), s)
    close(ours, want)
    close(g, r)


def test_modules_and_leading_dims():
    # [B, T, V] logits and [B, T] labels, as a language model gives them.
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    y = torch.randint(0, 11, (2, 3), generator=g)
    close(dl.KDLoss(temperature=2.0, alpha=0.4)(s, t, y),
          dl.kd_loss(s.reshape(6, 11), t.reshape(6, 11), y.reshape(6), 2.0, 0.4))
    close(dl.CrossEntropyLoss()(s, y), F.cross_entropy(s.reshape(6, 11), y.reshape(6)))
    rows = dl.SoftTargetLoss(temperature=2.0, reduction="none")(s, t)
    assert rows.shape == (2, 3)
    close(dl.MSELoss()(s, t), F.mse_loss(s.double(), t.double()))


def test_upstream_gradient_scales_the_gradient():
    s, t, y = make(seed=5)
    a = s.clone().requires_grad_()
    (3.0 * dl.kd_loss(a, t, y)).backward()
    b = s.clone().requires_grad_()
    dl.kd_loss(b, t, y).backward()
    close(a.grad, 3.0 * b.grad, atol=1e-6)
    # reduction='none': each row's upstream gradient scales its own row.
    c = s.clone().requires_grad_()
    w = torch.arange(s.shape[0], dtype=torch.float32)
    (dl.kd_loss(c, t, y, reduction="none") * w).sum().backward()
    d = s.clone().requires_grad_()
    dl.kd_loss(d, t, y, reduction="sum").backward()
    close(c.grad, w[:, None] * d.grad, atol=1e-6)


def test_half_and_double_inputs_follow_their_dtype():
    s, t, y = make(seed=6)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        a = s.to(dtype).requires_grad_()
        dl.kd_loss(a, t.to(dtype), y).backward()
        assert a.grad.dtype == dtype


def test_same_bits_for_any_thread_count():
    s, t, y = make(n=64, c=4099, seed=7)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            a = s.clone().requires_grad_()
            loss = dl.kd_loss(a, t, y)
            loss.backward()
            outs.append((loss.item(), a.grad.clone()))
    finally:
        torch.set_num_threads(old)
    for loss, g in outs[1:]:
        assert loss == outs[0][0] and torch.equal(g, outs[0][1])


def test_non_contiguous_inputs_are_copied():
    s, t, y = make(n=8, c=6, seed=8)
    close(dl.kd_loss(s.t().contiguous().t(), t, y), dl.kd_loss(s, t, y))
    wide = torch.randn(8, 12)
    close(dl.cross_entropy(wide[:, ::2], y), F.cross_entropy(wide[:, ::2], y))


def test_gradcheck_float64_promoted():
    # The kernels compute in float32: gradcheck runs on float64 inputs with a step and
    # tolerances that float32 rounding allows (eps 1e-3, atol 1e-3).
    s, t, y = make(n=4, c=5, seed=9, scale=1.0)
    s, t = s.double().requires_grad_(), t.double().requires_grad_()
    kw = dict(eps=1e-3, atol=1e-3, rtol=1e-3)
    assert torch.autograd.gradcheck(lambda a, b: dl.kd_loss(a, b, y, 2.0, 0.3), (s, t), **kw)
    assert torch.autograd.gradcheck(
        lambda a, b: dl.soft_target_loss(a, b, 1.5, divergence="jsd", beta=0.3), (s, t), **kw)
    assert torch.autograd.gradcheck(lambda a: dl.cross_entropy(a, y, label_smoothing=0.1), (s,),
                                    **kw)


def test_opcheck():
    s, t, y = make(n=4, c=5, seed=10)
    s.requires_grad_()
    y32 = y.to(torch.int32)
    torch.library.opcheck(torch.ops.distillation.hinton.default,
                          (s, t, y32, 2.0, 0.3, 0.0, -100, 0, False, True, False))
    torch.library.opcheck(torch.ops.distillation.cross_entropy.default,
                          (s, y32, 0.0, -100, 0, False, True))


@pytest.mark.parametrize("call,kind,words", [
    (lambda s, t, y: dl.kd_loss(s, t, y, temperature=0.0), dl.DistillationError, "temperature"),
    (lambda s, t, y: dl.kd_loss(s, t, y, alpha=1.5), dl.DistillationError, "alpha"),
    (lambda s, t, y: dl.kd_loss(s, t, y * 0 + 99), dl.DistillationError, "label"),
    (lambda s, t, y: dl.kd_loss(s, t, y * 0 + 2**40), dl.DistillationError, "label"),
    (lambda s, t, y: dl.kd_loss(s, t, y.float()), TypeError, "integer"),
    (lambda s, t, y: dl.kd_loss(s.long(), t, y), TypeError, "floating-point"),
    (lambda s, t, y: dl.kd_loss(s, t[:, :3], y), ValueError, "shape"),
    (lambda s, t, y: dl.kd_loss(s, t, y[:3]), ValueError, "one label per row"),
    (lambda s, t, y: dl.kd_loss(s[0], t[0], y[:1]), ValueError, "[N, C]"),
    (lambda s, t, y: dl.kd_loss(s[:0], t[:0], y[:0]), ValueError, "empty"),
    (lambda s, t, y: dl.kd_loss(s, t, y, reduction="mean"), ValueError, "batchmean"),
    (lambda s, t, y: dl.soft_target_loss(s, t, divergence="kl"), ValueError, "forward_kl"),
    (lambda s, t, y: dl.soft_target_loss(s, t, divergence="jsd", beta=1.5), dl.DistillationError,
     "beta"),
    (lambda s, t, y: dl.cross_entropy(s, y, label_smoothing=1.0), dl.DistillationError,
     "smoothing"),
    (lambda s, t, y: dl.cross_entropy(s, y, ignore_index=2**40), ValueError, "int32"),
    (lambda s, t, y: dl.kd_loss(s.to("meta"), t.to("meta"), y.to("meta")), ValueError, "meta"),
])
def test_bad_input_raises_with_the_message(call, kind, words):
    s, t, y = make(seed=11)
    with pytest.raises(kind) as info:
        call(s, t, y)
    assert words.lower() in str(info.value).lower(), str(info.value)


def test_custom_ops_called_directly_check_their_arrays():
    """``torch.ops.distillation.*`` trust no size: a teacher, labels or values smaller than the
    student's rows, int64 labels, float64, non-contiguous arrays or ints past int32 are a
    ValueError before C reads anything."""
    s, t, y = make(n=4, c=10, seed=13)
    y32 = y.to(torch.int32)
    ops = torch.ops.distillation
    hinton = lambda st, te, la, red=0: ops.hinton(st, te, la, 2.0, 0.3, 0.0, -100, red, False,
                                                   True, True)
    for st, te, la, red in [
        (s, t[:1], y32, 0),                  # a teacher of one row
        (s, t, y32[:2], 0),                  # short labels
        (s, t, y, 0),                        # int64 labels (read as int32 pairs)
        (s.double(), t.double(), y32, 0),    # float64
        (s.t().contiguous().t(), t, y32, 0),  # a column-major student
        (s, t, y32, 2 ** 32),                # reduction past int32 (ctypes would truncate)
    ]:
        with pytest.raises(ValueError, match="distillation::hinton"):
            hinton(st, te, la, red)
    with pytest.raises(ValueError, match="distillation::sparse_kd"):
        ops.sparse_kd(s, y32[:, None].clone()[:2], t[:2, :1].contiguous(), None, 0, 0.5, 0, 0,
                      1.0, 0.0, 0.0, -100, 0, False, True)
    with pytest.raises(ValueError, match="distillation::mse"):
        ops.mse(s.reshape(-1).double(), t.reshape(-1).double(), True, True)


def test_double_backward_is_an_error_not_a_silent_constant():
    s, t, y = make(n=4, c=5, seed=14)
    s.requires_grad_()
    loss = dl.kd_loss(s, t, y, 2.0, 0.3)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_a_learnable_temperature_is_refused():
    s, t, y = make(n=4, c=5, seed=16)
    T = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(TypeError, match="temperature"):
        dl.kd_loss(s, t, y, T, 0.3)
    with pytest.raises(TypeError, match="temperature"):
        dl.soft_target_loss(s, t, T)
    assert torch.equal(dl.kd_loss(s, t, y, T.detach(), 0.3), dl.kd_loss(s, t, y, 2.0, 0.3))


def test_narrow_and_wide_label_dtypes():
    s, t, y = make(n=4, c=5, seed=15)
    y = y.clamp(min=0)
    want = dl.kd_loss(s, t, y, 2.0, 0.3)
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(dl.kd_loss(s, t, y.to(dt), 2.0, 0.3), want), dt
    if hasattr(torch, "uint64"):
        with pytest.raises(TypeError, match="int64"):
            dl.kd_loss(s, t, y.to(torch.uint64), 2.0, 0.3)


def test_nan_in_nan_out():
    s, t, y = make(seed=12)
    s[3, 4] = float("nan")
    assert math.isnan(dl.kd_loss(s, t, y).item())


def _budget(got, exact, dtype):
    """docs/LOSSES.md's half-precision budget: the returned gradient's error within 1.5x the
    error of rounding the exact gradient once to ``dtype`` (mean and norm), >= 99.9% faithful."""
    got, exact = got.double(), exact.double()
    r = exact.to(dtype).double() - exact
    e = got - exact
    floor = 1e-6 * exact.norm()
    assert e.abs().mean() <= 1.5 * r.abs().mean() + floor / math.sqrt(e.numel()), (e, r)
    assert e.norm() <= 1.5 * r.norm() + floor, (e.norm(), r.norm())
    # Faithful: the rounded exact value or one of its two neighbours in ``dtype``.
    up = torch.nextafter(exact.to(dtype), torch.tensor(float("inf"), dtype=dtype)).double()
    down = torch.nextafter(exact.to(dtype), torch.tensor(float("-inf"), dtype=dtype)).double()
    faithful = (got == exact.to(dtype).double()) | (got == up) | (got == down)
    assert faithful.double().mean() >= 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["kd", "jsd", "ce", "dkd"])
def test_half_inputs_are_read_as_they_are_within_the_budget(dtype, loss):
    """bf16 / f16 logits go to the kernels as they are (no float32 copy): the loss is within 1e-4
    of the float64 loss of the same half values, the gradient (in the input's dtype) within the
    half-precision budget of the exact one."""
    s, t, y = make(n=16, c=1031, seed=11)
    s, t = s.to(dtype), t.to(dtype)
    y[3] = -100

    def ours(a, b):
        if loss == "kd":
            return dl.kd_loss(a, b, y, 2.0, 0.3)
        if loss == "jsd":
            return dl.soft_target_loss(a, b, 2.0, divergence="jsd", beta=0.3, labels=y)
        if loss == "ce":
            return dl.cross_entropy(a, y, label_smoothing=0.1)
        return dl.dkd_loss(a, b, y)

    def ref(a, b):
        a, b = a.double(), b.double()
        mask = (y != -100).double()
        valid = mask.sum()
        if loss == "kd":
            ce = F.cross_entropy(a, y, reduction="none", ignore_index=-100)
            return (0.3 * ce + 0.7 * kl_ref(a, b, 2.0, mask=mask)).mul(mask).sum() / valid
        if loss == "jsd":
            return kl_ref(a, b, 2.0, "jsd", 0.3, mask=mask).sum() / valid
        if loss == "ce":
            return F.cross_entropy(a, y, label_smoothing=0.1, ignore_index=-100)
        # DKD, mdistiller's composition, T = 4, alpha 1, beta 8.
        T, keep = 4.0, y.clamp(min=0)
        gt = F.one_hot(keep, a.shape[1]).bool()
        ps, pt = F.softmax(a / T, -1), F.softmax(b / T, -1)
        bs = torch.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1)
        bt = torch.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1)
        tckd = (bt * (bt.log() - bs.log())).sum(-1)
        ls = F.log_softmax(a / T - 1000.0 * gt, -1)
        lt = F.log_softmax(b / T - 1000.0 * gt, -1)
        nckd = (lt.exp() * (lt - ls)).sum(-1)
        ce = F.cross_entropy(a, y, reduction="none", ignore_index=-100)
        return ((ce + T * T * (tckd + 8.0 * nckd)) * mask).sum() / valid

    a = s.clone().requires_grad_()
    got = ours(a, t)
    got.backward()
    assert got.dtype == torch.float32 and a.grad.dtype == dtype
    x = s.double().requires_grad_()
    want = ref(x, t)
    want.backward()
    assert abs(got.item() - want.item()) <= 1e-4 * max(1.0, abs(want.item())), (got, want)
    _budget(a.grad, x.grad, dtype)


def test_mixed_dtypes_bf16_student_f32_teacher():
    s, t, y = make(n=8, c=257, seed=12)
    a = s.to(torch.bfloat16).requires_grad_()
    b = t.clone().requires_grad_()
    dl.kd_loss(a, b, y, 3.0, 0.2).backward()
    assert a.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
    a32 = s.to(torch.bfloat16).float().requires_grad_()
    b32 = t.clone().requires_grad_()
    dl.kd_loss(a32, b32, y, 3.0, 0.2).backward()
    close(b.grad, b32.grad, atol=1e-6)
    assert (a.grad.float() - a32.grad).abs().max() <= 2 ** -7 * a32.grad.abs().max()
