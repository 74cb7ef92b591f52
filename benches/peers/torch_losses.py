#!/usr/bin/env python3
"""Peers of the fused losses on the GPU machine: PyTorch eager, torch.compile and Liger-Kernel, on
the shapes of examples/gpu_bench.rs, printed as the same table (kernel, shape, backend, median ms,
GB/s of the minimal traffic, % of the device-to-device copy bandwidth measured in the same run).

    python3 benches/peers/torch_losses.py [--large] [--runs 20]

Forward and backward from raw f32 logits: Hinton alpha*CE + (1-alpha)*T^2*KL, forward KL, and
cross-entropy. Liger's KL path is log_softmax in PyTorch + LigerKLDIVLoss, as its docs show; its
cross-entropy is LigerCrossEntropyLoss. Liger (the `liger-kernel` wheel) travels with the staged
files, the GPU machine having no registry: pip install --no-index --target /tmp/site .whl/*.whl.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

try:
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
except Exception as e:  # noqa: BLE001 - report and go on without Liger
    print(f"liger-kernel not available: {e}")
    LigerCrossEntropyLoss = LigerKLDIVLoss = None

T, ALPHA = 4.0, 0.5


def hinton(s, t, y):
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    return ALPHA * ce + (1 - ALPHA) * T * T * kl


def forward_kl(s, t, y):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True) * T * T


def cross_entropy(s, t, y):
    return F.cross_entropy(s, y)


def timed(fn, inputs, runs):
    """Median seconds of forward + backward, CUDA events, inputs rotated."""
    times = []
    for i in range(runs + 3):
        s, t, y = inputs[i % len(inputs)]
        s.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(s, t, y).backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(n, c, runs):
    a = torch.empty(n * c, device="cuda")
    b = torch.empty_like(a)
    times = []
    for i in range(runs + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 8 * n * c / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    shapes = [(64, 10), (1024, 1000), (4096, 32000)] + ([(8192, 32000), (16384, 131072)] if args.large else [])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| kernel | shape | backend | median ms | GB/s | copy GB/s | % of copy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, c in shapes:
        per_set = 8 * n * c
        sets = max(2, min(8, (256 << 20) // per_set))
        if n * c >= 8192 * 32000:
            sets = 1  # 8.6 GB per tensor at the largest shape: L2 (50 MB) cannot flatter it
        inputs = [
            (torch.randn(n, c, device="cuda", requires_grad=True), torch.randn(n, c, device="cuda"),
             torch.randint(0, c, (n,), device="cuda"))
            for _ in range(sets)
        ]
        copy = copy_bandwidth(n, c, args.runs)
        peers = [("eager", hinton, forward_kl, cross_entropy)]
        try:
            peers.append(("torch.compile", torch.compile(hinton), torch.compile(forward_kl), torch.compile(cross_entropy)))
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile unavailable: {e}")
        if LigerKLDIVLoss is not None:
            lkl, lce = LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerCrossEntropyLoss()

            def l_kl(s, t, y):
                return lkl(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T

            def l_hinton(s, t, y):
                return ALPHA * lce(s, y) + (1 - ALPHA) * l_kl(s, t, y)

            peers.append(("liger", l_hinton, l_kl, lambda s, t, y: lce(s, y)))
        for backend, h, kl, ce in peers:
            for name, fn, per_elem in (("hinton", h, 12), ("forward_kl", kl, 12), ("cross_entropy", ce, 8)):
                try:
                    med = timed(fn, inputs, args.runs)
                except torch.OutOfMemoryError:
                    print(f"| {name} | {n}x{c} | {backend} | out of memory | | | |")
                    torch.cuda.empty_cache()
                    continue
                gbps = (per_elem * n * c + 4 * n) / med / 1e9
                print(f"| {name} | {n}x{c} | {backend} | {med * 1e3:.4f} | {gbps:.1f} | {copy:.1f} | {100 * gbps / copy:.0f}% |")


if __name__ == "__main__":
    main()
