"""Data parallel: a DDP-wrapped student trained with our loss on 2 gloo processes ends with the
parameters of a single-process run on the same global batch."""

import os
import socket

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
