"""torch.compile traces through the custom ops: one graph (fullgraph=True fails on a graph
break), the same loss and gradients as eager."""

import torch

import distillation as dl


def step(student, teacher, labels):
    return dl.kd_loss(student, teacher, labels, 3.0, 0.3) + 0.1 * dl.cross_entropy(student, labels)


def test_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 17, generator=g), torch.randn(6, 17, generator=g)
    y = torch.randint(0, 17, (6,), generator=g)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    eager = step(a, t, y)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(b, t, y)
    compiled.backward()
    assert torch.allclose(eager, compiled) and torch.allclose(a.grad, b.grad)


def test_no_graph_break():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 9, generator=g, requires_grad=True), torch.randn(4, 9, generator=g)
    y = torch.randint(0, 9, (4,), generator=g)
    explain = torch._dynamo.explain(step)(s, t, y)
    assert explain.graph_break_count == 0, explain.break_reasons
