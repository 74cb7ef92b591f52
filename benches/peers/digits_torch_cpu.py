#!/usr/bin/env python3
"""The default digits experiment of `distill` in PyTorch on the CPU, same configuration, to time
against our CPU backend on the same machine (`cargo run --release -- --backend cpu`):

teacher MLP 64-256-256-10 (200 epochs over the training fold), student 64-32-10; the student sees
5% of each training fold with labels (stratified), each step adding a batch of the same size from
the unlabelled rest, which gets only the soft-target term; loss alpha*CE(labelled) +
(1-alpha)*T^2*KL(all rows); the simple model is the student trained on the labelled part alone for
the same steps; Adam lr 1e-3, batch 32, T = 4, alpha = 0.2, 5 folds, pixels / 16.

    python3 benches/peers/digits_torch_cpu.py [--threads 2] [--folds-run 5] [--only 1,2,3]
        [--loss torch|distillation]

`--loss distillation` swaps the student's loss for the `distillation` package's (`pip install
./python`): the fused kernel for the labelled rows (alpha*CE + (1-alpha)*T^2*KL) and its soft-target
loss for the unlabelled rows, the same objective as PyTorch's composition below.

Folds side by side, as `distill --jobs 2` runs them (one thread each, two processes):

    python3 digits_torch_cpu.py --threads 1 --only 1,2,3 & python3 digits_torch_cpu.py --threads 1 --only 4,5
"""
import argparse
import gzip
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS = "torch"
HERE = os.path.dirname(os.path.abspath(__file__))


def load():
    rows = np.loadtxt(gzip.open(os.path.join(HERE, "../../data/digits.csv.gz"), "rt"), delimiter=",")
    return torch.tensor(rows[:, :64] / 16.0, dtype=torch.float32), torch.tensor(rows[:, 64], dtype=torch.long)


def mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train_ce(model, x, y, epochs, batch, gen):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def distil(student, teacher_logits, xl, yl, xu, tl_u, epochs, batch, t, alpha, gen):
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    pool, cursor = torch.randperm(len(xu), generator=gen), 0
    for _ in range(epochs):
        perm = torch.randperm(len(xl), generator=gen)
        for i in range(0, len(xl), batch):
            idx = perm[i:i + batch]
            take = []
            for _ in range(len(idx)):
                if cursor == len(pool):
                    pool, cursor = torch.randperm(len(xu), generator=gen), 0
                take.append(pool[cursor].item())
                cursor += 1
            x = torch.cat([xl[idx], xu[take]])
            tlog = torch.cat([teacher_logits[idx], tl_u[take]])
            opt.zero_grad()
            s = student(x)
            if LOSS == "distillation":
                # CE over the labelled rows, T^2 KL over all rows: the labelled rows carry a label,
                # the others ignore_index (masked from CE), each term a mean over its own rows.
                import distillation
                n = len(idx)
                ce = distillation.cross_entropy(s[:n], yl[idx])
                kl = distillation.soft_target_loss(s, tlog, t)
                (alpha * ce + (1 - alpha) * kl).backward()
            else:
                ce = F.cross_entropy(s[: len(idx)], yl[idx])
                kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(tlog / t, -1), reduction="batchmean", log_target=True)
                (alpha * ce + (1 - alpha) * t * t * kl).backward()
            opt.step()


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folds-run", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated 1-based folds to run (e.g. 1,2,3), "
                    "to run folds in separate processes side by side as `distill --jobs` does")
    ap.add_argument("--loss", choices=["torch", "distillation"], default="torch",
                    help="the student's distillation loss: PyTorch's composition or this crate's package")
    args = ap.parse_args()
    global LOSS
    LOSS = args.loss
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = load()
    perm = torch.randperm(len(x), generator=gen)
    folds = [perm[i * len(x) // 5:(i + 1) * len(x) // 5] for i in range(5)]
    res = []
    start = time.time()
    chosen = [int(v) - 1 for v in args.only.split(",") if v] or list(range(args.folds_run))
    for f in chosen:
        # Each fold has its own random streams, so a subset of folds (--only) in one process gives
        # the same numbers as the full run.
        gen = torch.Generator().manual_seed(1000 + f)
        torch.manual_seed(f)
        test = folds[f]
        train = torch.cat([folds[j] for j in range(5) if j != f])
        labelled = []
        for c in range(10):
            members = train[y[train] == c]
            labelled.append(members[: max(1, round(0.05 * len(members)))])
        labelled = torch.cat(labelled)
        unl = torch.tensor([i for i in train.tolist() if i not in set(labelled.tolist())])
        teacher = mlp([64, 256, 256, 10])
        train_ce(teacher, x[train], y[train], 200, 32, gen)
        with torch.no_grad():
            tl_l, tl_u = teacher(x[labelled]), teacher(x[unl])
        torch.manual_seed(100 + f)
        simple = mlp([64, 32, 10])
        torch.manual_seed(100 + f)
        student = mlp([64, 32, 10])
        train_ce(simple, x[labelled], y[labelled], 200, 32, gen)
        distil(student, tl_l, x[labelled], y[labelled], x[unl], tl_u, 200, 32, 4.0, 0.2, gen)
        r = (accuracy(teacher, x[test], y[test]), accuracy(student, x[test], y[test]), accuracy(simple, x[test], y[test]))
        print(f"fold {f + 1}: teacher {100 * r[0]:.2f}%  distilled {100 * r[1]:.2f}%  simple {100 * r[2]:.2f}%", flush=True)
        res.append(r)
    m = np.array(res).mean(0) * 100
    print(f"mean: teacher {m[0]:.2f}%  distilled {m[1]:.2f}%  simple {m[2]:.2f}%; {time.time() - start:.1f} s "
          f"with {args.threads} threads, torch {torch.__version__}, loss {args.loss}")


if __name__ == "__main__":
    main()
