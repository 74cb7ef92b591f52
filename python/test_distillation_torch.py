"""Compares python/distillation_torch.py (the crate's CUDA kernels through the C ABI) with PyTorch's
own losses on CUDA tensors. Needs torch, a CUDA device and the built library
(`cargo build --release`, or DISTILLATION_LIB=/path/to/libdistillation.so); skips otherwise.

    python -m pytest python/test_distillation_torch.py    (or: python python/test_distillation_torch.py)
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None

SKIP = None
if torch is None:
    SKIP = "torch is not installed"
elif not torch.cuda.is_available():
    SKIP = "no CUDA device"
else:
    try:
        import distillation_torch as dt

        dt.load()
        dt._context(torch.cuda.current_device())
    except (OSError, FileNotFoundError, RuntimeError) as e:  # no library, no NVRTC, ...
        SKIP = f"distillation library unavailable: {e}"


@unittest.skipIf(SKIP is not None, SKIP or "")
class DistillationTorchTest(unittest.TestCase):
    N, C = 37, 11

    def setUp(self):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.s = (torch.randn(self.N, self.C, generator=g) * 3).cuda()
        self.t = (torch.randn(self.N, self.C, generator=g) * 3).cuda()
        y = torch.randint(0, self.C, (self.N,), generator=g)
        y[::5] = -100
        self.y = y.cuda()

    def check(self, ours, theirs, s, s_ref, rtol=1e-4, atol=1e-5):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=rtol, atol=atol)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(s.grad, s_ref.grad, rtol=rtol, atol=atol)

    def leaves(self):
        return self.s.clone().requires_grad_(), self.s.clone().requires_grad_()

    def test_version(self):
        abi, v = dt.version()
        self.assertEqual(abi, 2)
        self.assertTrue(v)

    def test_cross_entropy_label_smoothing_ignore_index(self):
        for ls in (0.0, 0.1):
            s, r = self.leaves()
            ours = dt.cross_entropy(s, self.y, label_smoothing=ls, ignore_index=-100)
            theirs = F.cross_entropy(r, self.y, label_smoothing=ls, ignore_index=-100)
            self.check(ours, theirs, s, r)

    def test_forward_kl_matches_kl_div(self):
        T = 2.5
        s, r = self.leaves()
        ours = dt.kl_div(s, self.t, T)
        theirs = F.kl_div(F.log_softmax(r / T, -1), F.softmax(self.t / T, -1),
                          reduction="batchmean")
        self.check(ours, theirs, s, r)

    def test_forward_kl_teacher_probs_sum(self):
        T = 1.5
        p = F.softmax(self.t, -1)
        s, r = self.leaves()
        ours = dt.kl_div(s, p, T, teacher_input="probs", reduction="sum")
        theirs = F.kl_div(F.log_softmax(r / T, -1), p, reduction="sum")
        self.check(ours, theirs, s, r)

    def test_kd_loss_matches_hinton(self):
        T, alpha, ls = 4.0, 0.3, 0.1
        s, r = self.leaves()
        ours = dt.kd_loss(s, self.t, self.y, T, alpha, label_smoothing=ls)
        mask = (self.y != -100).float()
        ce = F.cross_entropy(r, self.y, ignore_index=-100, label_smoothing=ls)
        kl_rows = F.kl_div(F.log_softmax(r / T, -1), F.softmax(self.t / T, -1),
                           reduction="none").sum(-1)
        kl = (kl_rows * mask).sum() / mask.sum()
        theirs = alpha * ce + (1 - alpha) * T * T * kl
        self.check(ours, theirs, s, r)

    def test_grad_output_scales_gradient(self):
        s, r = self.leaves()
        (2.0 * dt.cross_entropy(s, self.y)).backward()
        (2.0 * F.cross_entropy(r, self.y)).backward()
        torch.testing.assert_close(s.grad, r.grad, rtol=1e-4, atol=1e-5)

    def test_bad_temperature_raises(self):
        with self.assertRaises(dt.DistillationError) as e:
            dt.kl_div(self.s, self.t, 0.0)
        self.assertIn("temperature", str(e.exception))


if __name__ == "__main__":
    unittest.main()
