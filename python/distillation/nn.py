"""``nn.Module`` forms of the losses, with PyTorch's and the peers' argument names."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import fused_linear, ops


class KDLoss(nn.Module):
    """The fused Hinton loss: ``forward(student_logits, teacher_logits, labels)``; see
    :func:`distillation.kd_loss`."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.2, label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "batchmean"):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha
        self.label_smoothing, self.ignore_index, self.reduction = (
            label_smoothing, ignore_index, reduction)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        return ops.kd_loss(student, teacher, labels, self.temperature, self.alpha,
                           label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
                           reduction=self.reduction)


class DKDLoss(nn.Module):
    """Decoupled knowledge distillation: ``forward(student_logits, teacher_logits, labels,
    epoch=None)``; see :func:`distillation.dkd_loss`. The KD terms are scaled by the linear
    warm-up ``min(epoch / warmup_epochs, 1)`` (mdistiller's, epochs counted from 1) when
    ``epoch`` is given and ``warmup_epochs > 0``, by 1 otherwise."""

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
                 ce_weight: float = 1.0, warmup_epochs: int = 20, label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "batchmean"):
        super().__init__()
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.ce_weight, self.warmup_epochs = ce_weight, warmup_epochs
        self.label_smoothing, self.ignore_index, self.reduction = (
            label_smoothing, ignore_index, reduction)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor,
                epoch: Optional[float] = None) -> Tensor:
        warmup = 1.0
        if epoch is not None and self.warmup_epochs > 0:
            warmup = min(float(epoch) / self.warmup_epochs, 1.0)
        return ops.dkd_loss(student, teacher, labels, self.temperature, self.alpha, self.beta,
                            ce_weight=self.ce_weight, warmup=warmup,
                            label_smoothing=self.label_smoothing,
                            ignore_index=self.ignore_index, reduction=self.reduction)


class SparseKDLoss(nn.Module):
    """Distillation from a sparse top-k teacher: ``forward(student_logits, indices, values,
    labels=None)``; see :func:`distillation.sparse_kd_loss`."""

    def __init__(self, temperature: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, values_kind: str = "logprobs", tail: str = "renormalize",
                 alpha: float = 0.0, label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean"):
        super().__init__()
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.values_kind, self.tail, self.alpha = values_kind, tail, alpha
        self.label_smoothing, self.ignore_index, self.reduction = (
            label_smoothing, ignore_index, reduction)

    def forward(self, student: Tensor, indices: Tensor, values: Tensor,
                labels: Optional[Tensor] = None) -> Tensor:
        return ops.sparse_kd_loss(student, indices, values, self.temperature,
                                  divergence=self.divergence, beta=self.beta,
                                  values_kind=self.values_kind, tail=self.tail, labels=labels,
                                  alpha=self.alpha, label_smoothing=self.label_smoothing,
                                  ignore_index=self.ignore_index, reduction=self.reduction)


class SoftTargetLoss(nn.Module):
    """A soft-target divergence: ``forward(student_logits, teacher, labels=None)``; see
    :func:`distillation.soft_target_loss`."""

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, teacher_input: str = "logits",
                 teacher_eps: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean", scale_t2: bool = True):
        super().__init__()
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.teacher_input, self.teacher_eps = teacher_input, teacher_eps
        self.ignore_index, self.reduction, self.scale_t2 = ignore_index, reduction, scale_t2

    def forward(self, student: Tensor, teacher: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return ops.soft_target_loss(student, teacher, self.temperature,
                                    divergence=self.divergence, beta=self.beta,
                                    teacher_input=self.teacher_input,
                                    teacher_eps=self.teacher_eps, labels=labels,
                                    ignore_index=self.ignore_index, reduction=self.reduction,
                                    scale_t2=self.scale_t2)


class CrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` with class-index targets: ``forward(input, target)``."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = (
            ignore_index, reduction, label_smoothing)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(input, target, label_smoothing=self.label_smoothing,
                                 ignore_index=self.ignore_index, reduction=self.reduction)


class MSELoss(nn.Module):
    """Feature MSE (FitNets hint): ``forward(a, b)``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return ops.mse(a, b)


class FusedLinearKDLoss(nn.Module):
    """The fused linear layer + distillation loss with Liger's call order (its
    ``LigerFusedLinearJSDLoss``): ``forward(student_input, student_weight, teacher_input,
    teacher_weight, true_labels, student_bias=None, teacher_bias=None)``; see
    :func:`distillation.fused_linear_kd_loss`. ``FusedLinearKDLoss(weighting="liger",
    divergence="jsd", beta=b, temperature=T, weight_hard=wh, weight_soft=ws)`` is Liger's
    ``LigerFusedLinearJSDLoss(weight_hard_loss=wh, weight_soft_loss=ws, beta=b, temperature=T)``
    (``docs/PYTHON.md`` says where they differ)."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, weighting: str = "hinton",
                 weight_hard: float = 0.5, weight_soft: float = 0.5,
                 label_smoothing: float = 0.0, ignore_index: int = -100,
                 reduction: str = "batchmean", memory_budget: Optional[int] = None,
                 chunk_rows: Optional[int] = None):
        super().__init__()
        self.temperature, self.alpha, self.divergence, self.beta = (
            temperature, alpha, divergence, beta)
        self.weighting, self.weight_hard, self.weight_soft = weighting, weight_hard, weight_soft
        self.label_smoothing, self.ignore_index, self.reduction = (
            label_smoothing, ignore_index, reduction)
        self.memory_budget, self.chunk_rows = memory_budget, chunk_rows

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                teacher_weight: Tensor, true_labels: Optional[Tensor],
                student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear.fused_linear_kd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=self.temperature,
            alpha=self.alpha, divergence=self.divergence, beta=self.beta,
            weighting=self.weighting, weight_hard=self.weight_hard,
            weight_soft=self.weight_soft, label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index, reduction=self.reduction,
            memory_budget=self.memory_budget, chunk_rows=self.chunk_rows)
