#!/usr/bin/env python3
"""Peers of the fused losses: PyTorch eager, torch.compile and Liger-Kernel, on the shapes of
examples/gpu_bench.rs (GPU) or examples/cpu_bench.rs (CPU), printed as the same table (kernel,
shape, backend, median ms, GB/s of the minimal traffic, % of the floor's bandwidth measured in the
same run: a device-to-device copy on the GPU, a streaming c = a + b on the CPU).

    python3 benches/peers/torch_losses.py [--large] [--runs 20]            # CUDA
    python3 benches/peers/torch_losses.py --device cpu --threads 2         # CPU
    python3 benches/peers/torch_losses.py --device cpu --dtype bf16        # bf16 logits
    python3 benches/peers/torch_losses.py --device cpu --sparse            # sparse top-k teachers

--sparse: a teacher of k = 16, 64, 128 log-probabilities per row (forward KL, T = 1, the top-k
renormalised): PyTorch's best composition, log_softmax of the student, gather at the teacher's
indices, the renormalised teacher's weights (backward: autograd's scatter); traffic counted as in
examples/cpu_bench.rs --sparse (8 bytes per dense element, 8 per teacher entry).

Forward and backward from raw f32 (or, with --dtype, bf16 / f16: PyTorch computing on those tensors
as a trainer with half logits would, its traffic counted at 2 bytes per element) logits: Hinton alpha*CE + (1-alpha)*T^2*KL, forward KL, and
cross-entropy. Liger's KL path is log_softmax in PyTorch + LigerKLDIVLoss, as its docs show; its
cross-entropy is LigerCrossEntropyLoss. Liger (the `liger-kernel` wheel) travels with the staged
files, the GPU machine having no registry: pip install --no-index --target /tmp/site .whl/*.whl.
"""
import argparse
import statistics
import time

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


def sparse_kl(s, idx, lq):
    """Forward KL against a top-k teacher renormalised over its support, batchmean (T = 1)."""
    lp = F.log_softmax(s, -1).gather(1, idx)
    q = F.softmax(lq, -1)
    return (q * (q.clamp_min(1e-45).log() - lp)).sum() / s.shape[0]


def sparse_main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| kernel | shape | backend | median ms | GB/s | c = a + b GB/s | % of c = a + b |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, c in args.sparse_shapes:
        s = torch.randn(n, c).mul(5).requires_grad_()
        t = torch.randn(n, c).mul(5)
        copy = add_bandwidth_cpu(n, c, args.runs)
        for k in (16, 64, 128):
            lq, idx = F.log_softmax(t, -1).topk(k, -1)
            for backend, fn in (("eager", sparse_kl), ("torch.compile", torch.compile(sparse_kl))):
                med = timed_cpu(fn, [(s, idx, lq)], args.runs)
                gbps = (8 * n * c + 8 * n * k) / med / 1e9
                print(f"| sparse_k{k}_renormalize | {n}x{c} | {backend} | {med * 1e3:.4f} | {gbps:.1f} | "
                      f"{copy:.1f} | {100 * gbps / copy:.0f}% |")


def timed_cpu(fn, inputs, runs):
    """Median seconds of forward + backward on the CPU (wall clock), inputs rotated."""
    times = []
    for i in range(runs + 2):
        s, t, y = inputs[i % len(inputs)]
        s.grad = None
        start = time.perf_counter()
        fn(s, t, y).backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_bandwidth_cpu(n, c, runs):
    """GB/s of c = a + b over [n, c] f32 (12 bytes per element), as examples/cpu_bench.rs."""
    a, b = torch.randn(n * c), torch.randn(n * c)
    out = torch.empty_like(a)
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        torch.add(a, b, out=out)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 12 * n * c / statistics.median(times) / 1e9


def timed(fn, inputs, runs):
    """Median seconds of forward + backward, CUDA events, inputs rotated."""
    if inputs[0][0].device.type == "cpu":
        return timed_cpu(fn, inputs, runs)
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
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0: default)")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32", help="logits' dtype")
    ap.add_argument("--sparse", action="store_true", help="CPU: sparse top-k teachers")
    ap.add_argument("--sparse-shapes", default="256x32000,64x131072",
                    type=lambda v: [tuple(int(x) for x in p.split("x")) for p in v.split(",")])
    args = ap.parse_args()
    if args.sparse:
        return sparse_main(args)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    size = 4 if args.dtype == "f32" else 2
    dev = args.device
    if dev == "cpu":
        if args.threads:
            torch.set_num_threads(args.threads)
        shapes = [(1024, 1000), (2048, 32000), (4096, 32000)]
        print(f"device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print("| kernel | shape | backend | median ms | GB/s | c = a + b GB/s | % of c = a + b |")
    else:
        shapes = [(64, 10), (1024, 1000), (4096, 32000)] + ([(8192, 32000), (16384, 131072)] if args.large else [])
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        print("| kernel | shape | backend | median ms | GB/s | copy GB/s | % of copy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, c in shapes:
        per_set = 8 * n * c
        sets = max(2, min(8, (256 << 20) // per_set))
        if n * c >= 8192 * 32000:
            sets = 1  # 8.6 GB per tensor at the largest shape: L2 (50 MB) cannot flatter it
        if dev == "cpu":
            sets = 1
        inputs = [
            (torch.randn(n, c, device=dev).to(dtype).requires_grad_(), torch.randn(n, c, device=dev).to(dtype),
             torch.randint(0, c, (n,), device=dev))
            for _ in range(sets)
        ]
        copy = add_bandwidth_cpu(n, c, args.runs) if dev == "cpu" else copy_bandwidth(n, c, args.runs)
        peers = [("eager", hinton, forward_kl, cross_entropy)]
        try:
            peers.append(("torch.compile", torch.compile(hinton), torch.compile(forward_kl), torch.compile(cross_entropy)))
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile unavailable: {e}")
        if LigerKLDIVLoss is not None and dev == "cuda":
            lkl, lce = LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerCrossEntropyLoss()

            def l_kl(s, t, y):
                return lkl(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T

            def l_hinton(s, t, y):
                return ALPHA * lce(s, y) + (1 - ALPHA) * l_kl(s, t, y)

            peers.append(("liger", l_hinton, l_kl, lambda s, t, y: lce(s, y)))
        for backend, h, kl, ce in peers:
            suffix = "" if args.dtype == "f32" else f"_{args.dtype}"
            for name, fn, per_elem in (("hinton", h, 3 * size), ("forward_kl", kl, 3 * size), ("cross_entropy", ce, 2 * size)):
                name += suffix
                try:
                    med = timed(fn, inputs, args.runs)
                except torch.OutOfMemoryError:
                    print(f"| {name} | {n}x{c} | {backend} | out of memory | | | |")
                    if dev == "cuda":
                        torch.cuda.empty_cache()
                    continue
                gbps = (per_elem * n * c + 4 * n) / med / 1e9
                print(f"| {name} | {n}x{c} | {backend} | {med * 1e3:.4f} | {gbps:.1f} | {copy:.1f} | {100 * gbps / copy:.0f}% |")


if __name__ == "__main__":
    main()
