"""torch.distributed with gloo: data parallel (a DDP-wrapped student trained with our loss on 2
processes ends with the parameters of a single-process run on the same global batch), and vocab
parallel (the sharded two-phase losses with the vocabulary split over 2 processes, the stats
all-reduced with torch.distributed, against the unsharded loss and gradients)."""

import os
import socket

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distillation as dl

STEPS, BATCH, FEATURES, CLASSES = 5, 8, 12, 7


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS, BATCH, FEATURES, generator=g)
    teacher = torch.randn(STEPS, BATCH, CLASSES, generator=g)
    y = torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)
    return x, teacher, y


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, CLASSES))


def train(net, rank=0, world=1):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, teacher, y = data()
    per = BATCH // world
    for i in range(STEPS):
        rows = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        dl.kd_loss(net(x[i, rows]), teacher[i, rows], y[i, rows], 2.0, 0.3).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = torch.nn.parallel.DistributedDataParallel(model())
    params = train(net, rank, world)
    if rank == 0:
        torch.save(params, out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "params.pt")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    single = train(model())
    # batchmean over each half, gradients averaged by DDP: the mean over the global batch.
    for a, b in zip(ddp, single):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


# ---- vocab-parallel: the sharded two-phase losses over 2 gloo processes ----

ROWS, VOCAB, SPLIT = 6, 11, 5  # rank 0 holds columns 0..5, rank 1 columns 5..11


def vocab_data():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(ROWS, VOCAB, generator=g) * 3
    t = torch.randn(ROWS, VOCAB, generator=g) * 3
    y = torch.tensor([0, 10, -100, 4, 5, 7])  # labels in both halves, one masked row
    return s, t, y


VOCAB_CASES = [
    dict(loss="hinton", temperature=2.0, alpha=0.3, label_smoothing=0.1),
    dict(loss="cross_entropy", label_smoothing=0.2),
    dict(loss="divergence", divergence="reverse_kl", temperature=3.0),
    dict(loss="divergence", divergence="jsd", beta=0.3, temperature=1.5),
    # the teacher given as probabilities / log-probabilities (T on the student only)
    dict(loss="hinton", temperature=2.0, alpha=0.3, teacher_input="probs"),
    dict(loss="divergence", divergence="jsd", beta=0.3, temperature=1.5, teacher_input="logprobs"),
    dict(loss="divergence", divergence="reverse_kl", temperature=3.0, teacher_input="probs"),
    # decoupled KD (its stats over the rest of each row; the teacher detached)
    dict(loss="dkd", temperature=2.0, ce_weight=0.7, tckd_weight=1.0, nckd_weight=2.0,
         label_smoothing=0.1),
]


def given(t, form):
    """The teacher as the case gives it: logits, or softmax / log_softmax of the logits (f32)."""
    if form == "probs":
        return torch.softmax(t, -1)
    if form == "logprobs":
        return torch.log_softmax(t, -1)
    return t


def vocab_worker(rank, world, port, out):
    import distillation.sharded as sh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s, t, y = vocab_data()
    cols = slice(0, SPLIT) if rank == 0 else slice(SPLIT, VOCAB)
    offset = 0 if rank == 0 else SPLIT
    results = []
    for case in VOCAB_CASES:
        form = case.get("teacher_input", "logits")
        s_shard = s[:, cols].clone().requires_grad_(True)
        t_shard = given(t, form)[:, cols].clone()
        t_shard.requires_grad_(case["loss"] not in ("cross_entropy", "dkd") and form == "logits")
        teacher = t_shard if case["loss"] != "cross_entropy" else None
        labels = y if case["loss"] != "divergence" else None
        loss = sh.sharded_kd_loss(s_shard, teacher, labels, classes=VOCAB, offset=offset, **case)
        loss.backward()
        results.append((loss.detach(), s_shard.grad, t_shard.grad))
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def unsharded(case, s, t, y):
    """The same loss in float64 with PyTorch's own functions, and its gradients."""
    import torch.nn.functional as F

    form = case.get("teacher_input", "logits")
    s = s.double().requires_grad_(True)
    t = t.double().requires_grad_(True)
    T = case.get("temperature", 1.0)
    valid = (y != -100).sum()
    # the teacher's log q: log_softmax(t / T) of logits, the given values' logs otherwise
    lq_of = {"logits": lambda: F.log_softmax(t / T, -1), "probs": lambda: torch.log(t),
             "logprobs": lambda: t}[form]
    if case["loss"] == "dkd":
        # mdistiller's dkd_loss: TCKD on [p_g, 1 - p_g], NCKD on the non-target classes (the
        # target masked out of both softmaxes), CE with label smoothing, masked rows dropped
        ce = F.cross_entropy(s, y, ignore_index=-100, label_smoothing=case.get("label_smoothing", 0.0))
        mask = (y != -100).double()
        g = y.clamp(min=0)[:, None]
        onehot = torch.zeros_like(s).scatter_(1, g, 1.0)
        p, q = F.softmax(s / T, -1), F.softmax(t / T, -1)
        pg, qg = p.gather(1, g)[:, 0], q.gather(1, g)[:, 0]
        tckd = qg * torch.log(qg / pg) + (1 - qg) * torch.log((1 - qg) / (1 - pg))
        lp_hat = F.log_softmax(s / T - 1e4 * onehot, -1)
        lq_hat = F.log_softmax(t / T - 1e4 * onehot, -1)
        nckd = (lq_hat.exp() * (lq_hat - lp_hat)).sum(-1)
        kd = T * T * (case["tckd_weight"] * tckd + case["nckd_weight"] * nckd)
        loss = case["ce_weight"] * ce + (kd * mask).sum() / valid
    elif case["loss"] == "cross_entropy":
        loss = F.cross_entropy(s, y, ignore_index=-100, label_smoothing=case.get("label_smoothing", 0.0))
    elif case["loss"] == "hinton":
        ce = F.cross_entropy(s, y, ignore_index=-100, label_smoothing=case.get("label_smoothing", 0.0))
        mask = (y != -100).double()[:, None]
        kl = (F.kl_div(F.log_softmax(s / T, -1), lq_of(), log_target=True,
                       reduction="none") * mask).sum() / valid
        loss = case["alpha"] * ce + (1 - case["alpha"]) * T * T * kl
    else:
        lp, lq = F.log_softmax(s / T, -1), lq_of()
        if case["divergence"] == "forward_kl":
            d = (lq.exp() * (lq - lp)).sum(-1)
        elif case["divergence"] == "reverse_kl":
            d = (lp.exp() * (lp - lq)).sum(-1)
        else:
            b = case["beta"]
            lm = torch.logsumexp(torch.stack([lq + torch.log(torch.tensor(b, dtype=torch.float64)),
                                              lp + torch.log(torch.tensor(1 - b, dtype=torch.float64))]), 0)
            d = b * (lq.exp() * (lq - lm)).sum(-1) + (1 - b) * (lp.exp() * (lp - lm)).sum(-1)
        loss = T * T * d.mean()  # no labels: every row valid
    loss.backward()
    return loss.detach(), s.grad, t.grad


def test_vocab_parallel_two_processes_match_unsharded(tmp_path):
    out = str(tmp_path / "vocab")
    mp.spawn(vocab_worker, args=(2, free_port(), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    s, t, y = vocab_data()
    for case, a, b in zip(VOCAB_CASES, r0, r1):
        form = case.get("teacher_input", "logits")
        want_loss, want_gs, want_gt = unsharded(case, s, given(t, form), y)
        # every rank has the whole loss
        for got in (a[0], b[0]):
            assert abs(float(got) - float(want_loss)) <= 1e-5 * abs(float(want_loss)) + 1e-6, case
        gs = torch.cat([a[1], b[1]], dim=1).double()
        assert torch.allclose(gs, want_gs, atol=2e-6, rtol=1e-4), (case, (gs - want_gs).abs().max())
        if case["loss"] not in ("cross_entropy", "dkd") and form == "logits":
            gt = torch.cat([a[2], b[2]], dim=1).double()
            assert torch.allclose(gt, want_gt, atol=2e-6, rtol=1e-4), (case, (gt - want_gt).abs().max())


def test_sharded_in_one_process_matches_the_unsharded_ops():
    """Three shards in one process, combined with combine_stats, against dl.kd_loss."""
    import distillation.sharded as sh

    s, t, y = vocab_data()
    cfg = sh.Config("hinton", temperature=2.0, alpha=0.3)
    bounds = [(0, 1), (1, 6), (6, VOCAB)]
    parts = [(s[:, a:b].contiguous(), t[:, a:b].contiguous(), a) for a, b in bounds]
    st = sh.combine_stats([sh.stats(cfg, ps, pt, y, VOCAB, o) for ps, pt, o in parts], 2.0)
    outs = [sh.loss_and_grad(cfg, ps, pt, y, st, VOCAB, o) for ps, pt, o in parts]
    loss = sum(float(o[0]) for o in outs)
    grad = torch.cat([o[2] for o in outs], dim=1)
    ss = s.clone().requires_grad_(True)
    want = dl.kd_loss(ss, t, y, 2.0, 0.3)
    want.backward()
    assert abs(loss - float(want.detach())) <= 1e-5 * abs(float(want.detach()))
    assert torch.allclose(grad, ss.grad, atol=1e-6, rtol=1e-4)


def test_sharded_given_teacher_in_one_process():
    """Three shards in one process, the teacher as probabilities and log-probabilities, every
    teacher loss against the same float64 loss with PyTorch's functions."""
    import distillation.sharded as sh

    s, t, y = vocab_data()
    bounds = [(0, 1), (1, 6), (6, VOCAB)]
    cases = [dict(loss="divergence", divergence=d, temperature=2.5, beta=0.4)
             for d in ("forward_kl", "reverse_kl", "jsd")]
    cases.append(dict(loss="hinton", temperature=2.5, alpha=0.3, label_smoothing=0.1))
    for form in ("probs", "logprobs"):
        tg = given(t, form)
        for case in cases:
            case = dict(case, teacher_input=form)
            cfg = sh.Config(**case)
            labels = y if case["loss"] == "hinton" else None
            parts = [(s[:, a:b].contiguous(), tg[:, a:b].contiguous(), a) for a, b in bounds]
            st = sh.combine_stats([sh.stats(cfg, ps, pt, labels, VOCAB, o) for ps, pt, o in parts],
                                  cfg.temperature)
            jsd = None
            if cfg.is_jsd:
                jsd = sum(sh.jsd_terms(cfg, ps, pt, labels, st, VOCAB, o) for ps, pt, o in parts)
            outs = [sh.loss_and_grad(cfg, ps, pt, labels, st, VOCAB, o, jsd) for ps, pt, o in parts]
            loss = sum(float(o[0]) for o in outs)
            grad = torch.cat([o[2] for o in outs], dim=1).double()
            want_loss, want_gs, _ = unsharded(case, s, tg, y if labels is not None else
                                               torch.zeros(ROWS, dtype=torch.long))
            assert abs(loss - float(want_loss)) <= 1e-5 * abs(float(want_loss)) + 1e-6, case
            assert torch.allclose(grad, want_gs, atol=2e-6, rtol=1e-4), (case, (grad - want_gs).abs().max())


def test_sharded_given_teacher_errors():
    import distillation.sharded as sh
    import pytest

    s, t, y = vocab_data()
    q = torch.softmax(t, -1)
    q[0, 2] = 0.0  # an exact zero: reverse KL is +inf there
    cfg = sh.Config("divergence", divergence="reverse_kl", temperature=2.0, teacher_input="probs")
    with pytest.raises(dl.DistillationError, match="probability 0"):
        sh.stats(cfg, s[:, :5].contiguous(), q[:, :5].contiguous(), None, VOCAB, 0)
    fwd = sh.Config("divergence", temperature=2.0, teacher_input="probs")
    st = sh.stats(fwd, s.contiguous(), q.contiguous(), None, VOCAB, 0)
    with pytest.raises(dl.DistillationError, match="teacher as logits"):
        sh.loss_and_grad(fwd, s.contiguous(), q.contiguous(), None, st, VOCAB, 0, teacher_grad=True)
    with pytest.raises(ValueError, match="teacher_input"):
        sh.Config("hinton", teacher_input="probabilities")


def test_sharded_bad_input_is_a_python_error():
    import distillation.sharded as sh
    import pytest

    s, t, y = vocab_data()
    cfg = sh.Config("hinton", temperature=2.0, alpha=0.3)
    with pytest.raises(dl.DistillationError, match="offset"):
        sh.stats(cfg, s[:, :5].contiguous(), t[:, :5].contiguous(), y, VOCAB, 8)
    with pytest.raises(dl.DistillationError, match="label"):
        sh.stats(cfg, s[:, :5].contiguous(), t[:, :5].contiguous(), y + 20, VOCAB, 0)
    with pytest.raises(ValueError, match="floating point"):
        sh.stats(cfg, s[:, :5].long(), t[:, :5].contiguous(), y, VOCAB, 0)
    # shapes the C side would read past: a teacher shard of other columns, short stats / terms
    with pytest.raises(ValueError, match="teacher has shape"):
        sh.stats(cfg, s[:, :5].contiguous(), t[:, :3].contiguous(), y, VOCAB, 0)
    st = sh.stats(cfg, s.contiguous(), t.contiguous(), y, VOCAB, 0)
    with pytest.raises(ValueError, match="global_stats has 5 elements"):
        sh.loss_and_grad(cfg, s.contiguous(), t.contiguous(), y, st[:5], VOCAB, 0)
    jcfg = sh.Config("divergence", divergence="jsd", temperature=2.0)
    jst = sh.stats(jcfg, s.contiguous(), t.contiguous(), None, VOCAB, 0)
    with pytest.raises(ValueError, match="jsd_terms has 1 elements"):
        sh.loss_and_grad(jcfg, s.contiguous(), t.contiguous(), None, jst, VOCAB, 0, jst[:1])
    # an int64 label past int32 stays out of range instead of wrapping to class 7
    with pytest.raises(dl.DistillationError, match="label"):
        sh.stats(cfg, s.contiguous(), t.contiguous(), y + 2 ** 32, VOCAB, 0)
    with pytest.raises(ValueError, match="int32"):
        sh.Config("hinton", ignore_index=2 ** 40)
    with pytest.raises(ValueError, match="reduction"):
        sh.Config("hinton", reduction="mean")
    # without torch.distributed a partial shard is not the loss
    if not (dist.is_available() and dist.is_initialized()):
        with pytest.raises(ValueError, match="not initialised"):
            sh.sharded_kd_loss(s[:, :5].contiguous(), t[:, :5].contiguous(), y, classes=VOCAB,
                               offset=0, temperature=2.0)
    # global maxima below the shard's (a SUM where a MAX belongs), or the maxima plane itself
    n = s.shape[0]
    with pytest.raises(dl.DistillationError, match="all-reduce MAX"):
        sh.rescale_stats(st.clone(), st[: 2 * n] - 1.0, 2.0)
    with pytest.raises(dl.DistillationError, match="overlap"):
        sh.rescale_stats(st, st[: 2 * n], 2.0)


def test_sharded_dkd_in_one_process():
    """Sharded DKD over 1, 3 and 4 shards (one of width 1 holding a label alone) in one process
    against the unsharded float64 loss; the teacher gets no gradient, a given teacher is an
    error."""
    import distillation.sharded as sh

    s, t, y = vocab_data()
    case = dict(loss="dkd", temperature=3.0, ce_weight=1.0, tckd_weight=1.0, nckd_weight=8.0,
                label_smoothing=0.1)
    cfg = sh.Config(**case)
    want_loss, want_gs, _ = unsharded(case, s, t, y)
    for bounds in ([(0, VOCAB)], [(0, 1), (1, 6), (6, VOCAB)], [(0, 4), (4, 5), (5, 9), (9, VOCAB)]):
        parts = [(s[:, a:b].contiguous(), t[:, a:b].contiguous(), a) for a, b in bounds]
        st = sh.combine_stats([sh.stats(cfg, ps, pt, y, VOCAB, o) for ps, pt, o in parts],
                              cfg.temperature)
        outs = [sh.loss_and_grad(cfg, ps, pt, y, st, VOCAB, o) for ps, pt, o in parts]
        loss = sum(float(o[0]) for o in outs)
        grad = torch.cat([o[2] for o in outs], dim=1).double()
        assert abs(loss - float(want_loss)) <= 1e-5 * abs(float(want_loss)) + 1e-6, bounds
        assert torch.allclose(grad, want_gs, atol=2e-6, rtol=1e-4), (bounds, (grad - want_gs).abs().max())
    with pytest.raises(Exception, match="detached"):
        sh.loss_and_grad(cfg, s, t, y, st, VOCAB, 0, teacher_grad=True)
    with pytest.raises(Exception, match="logits"):
        sh.stats(sh.Config(**dict(case, teacher_input="probs")), s, torch.softmax(t, -1), y, VOCAB, 0)


def test_sharded_on_cuda_tensors_matches_the_cpu():
    """CUDA tensors run ``dst_cuda_sharded_*`` (the stats rescaled on a host copy): three shards
    in one process, every loss, against the same shards on CPU tensors."""
    from conftest import cuda_or_skip
    import distillation.sharded as sh

    cuda_or_skip()
    s, t, y = vocab_data()
    bounds = [(0, 1), (1, 6), (6, VOCAB)]
    for case in VOCAB_CASES:
        cfg = sh.Config(**case)
        tg = given(t, case.get("teacher_input", "logits"))
        labels = y if case["loss"] != "divergence" else None
        teacher = tg if case["loss"] != "cross_entropy" else None
        results = []
        for dev in ("cpu", "cuda"):
            parts = [(s[:, a:b].contiguous().to(dev),
                      None if teacher is None else teacher[:, a:b].contiguous().to(dev), a)
                     for a, b in bounds]
            yy = None if labels is None else labels.to(dev)
            st = sh.combine_stats([sh.stats(cfg, ps, pt, yy, VOCAB, o) for ps, pt, o in parts],
                                  cfg.temperature)
            jsd = None
            if cfg.is_jsd:
                jsd = sum(sh.jsd_terms(cfg, ps, pt, yy, st, VOCAB, o) for ps, pt, o in parts)
            outs = [sh.loss_and_grad(cfg, ps, pt, yy, st, VOCAB, o, jsd) for ps, pt, o in parts]
            results.append((sum(float(o[0]) for o in outs),
                            torch.cat([o[2].cpu() for o in outs], dim=1)))
        (lc, gc), (lg, gg) = results
        assert abs(lc - lg) <= 1e-5 * abs(lc) + 1e-6, case
        assert torch.allclose(gc, gg, atol=2e-6, rtol=1e-4), case


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sharded_half_logits_return_half_gradients(dtype):
    """bfloat16 / float16 shards: the loss of their float32 values (exact conversion), the
    gradients in the input's dtype, each the float32 gradient rounded once."""
    import distillation.sharded as sh

    s, t, y = vocab_data()
    sh16, th16 = s.to(dtype), t.to(dtype)
    kw = dict(classes=VOCAB, offset=0, loss="hinton", temperature=2.0, alpha=0.3)
    a = sh16.clone().requires_grad_(True)
    b = th16.clone().requires_grad_(True)
    loss = sh.sharded_kd_loss(a, b, y, **kw)
    loss.backward()
    a32 = sh16.float().requires_grad_(True)
    b32 = th16.float().requires_grad_(True)
    want = sh.sharded_kd_loss(a32, b32, y, **kw)
    want.backward()
    assert float(loss.detach()) == float(want.detach())
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert torch.equal(a.grad, a32.grad.to(dtype))
    assert torch.equal(b.grad, b32.grad.to(dtype))
