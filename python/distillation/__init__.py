"""Knowledge-distillation losses for PyTorch on the ``distillation`` crate's kernels.

    import distillation
    loss = distillation.kd_loss(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.2)
    loss.backward()

CPU tensors run on the crate's fast CPU backend, CUDA tensors on its CUDA kernels on PyTorch's
current stream; each loss is a ``torch.library`` custom op (``distillation::hinton``,
``::divergence``, ``::dkd``, ``::sparse_kd``, ``::cross_entropy``, ``::mse``, and
``::fused_linear_kd``, the output layer and the loss fused: hidden states in), so
``torch.compile`` keeps it in one graph.
The conventions beside ``F.kl_div``, ``F.cross_entropy``, TRL and Liger: ``docs/PYTHON.md``.
"""

from ._lib import DistillationError, version
from .fused_linear import fused_linear_kd_loss
from .nn import (CrossEntropyLoss, DKDLoss, FusedLinearKDLoss, KDLoss, MSELoss, SoftTargetLoss,
                 SparseKDLoss)
from .ops import cross_entropy, dkd_loss, kd_loss, mse, soft_target_loss, sparse_kd_loss
from . import sharded

__all__ = [
    "DistillationError", "version", "kd_loss", "dkd_loss", "soft_target_loss", "cross_entropy",
    "mse", "sparse_kd_loss", "KDLoss", "DKDLoss", "SoftTargetLoss", "SparseKDLoss",
    "CrossEntropyLoss", "MSELoss", "sharded", "fused_linear_kd_loss", "FusedLinearKDLoss",
]
