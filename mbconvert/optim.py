"""The optimiser recipe, written once for every training loop (mbconvert.train's students and recovery).

AdamW with weight decay on matrices only (biases and norm weights are 1-D), a linear warm-up then linear decay of
the learning rate, the knowledge-distillation + cross-entropy mix, and optional bfloat16 autocast on any device.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .losses import kd_logits


def param_groups(params, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only (not on biases and norm weights). `base_lr` is what the schedule scales."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return [dict(g, lr=lr, base_lr=lr) for g in groups if g["params"]]


def lr_scale(progress: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` share of a run, then linear decay to zero at progress 1."""
    if progress < warmup:
        return progress / warmup
    return max(0.0, (1.0 - progress) / max(1e-12, 1.0 - warmup))


def set_lr(optimizer: torch.optim.Optimizer, progress: float, warmup: float) -> None:
    scale = lr_scale(min(1.0, progress), warmup)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * scale


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor | None,
                      alpha: float, temperature: float, ce_rows: torch.Tensor | None = None,
                      rows: slice | None = None) -> torch.Tensor:
    """alpha·T²·KL(teacher ‖ model) + (1 − alpha)·CE(labels): KL alone without labels (or when `ce_rows`, the rows
    whose labels hold, selects none), CE alone without a teacher.

    `rows` (several processes, with a teacher): `logits` are the model's on these rows of the batch only, while
    `teacher_logits`, `labels` and `ce_rows` cover the whole batch; the result is their share of the batch's loss (the
    KL weighted by their share of the rows, the CE by their share of the CE rows), so that the shares of all
    processes add up to the loss of the whole batch."""
    if teacher_logits is None:
        return F.cross_entropy(logits.float(), labels)
    if rows is not None:
        return _distillation_share(logits, teacher_logits, labels, alpha, temperature, ce_rows, rows)
    kd = kd_logits(logits, teacher_logits, temperature)
    if labels is None or (ce_rows is not None and not ce_rows.any()):
        return kd
    if ce_rows is not None:
        logits, labels = logits[ce_rows], labels[ce_rows]
    return alpha * kd + (1 - alpha) * F.cross_entropy(logits.float(), labels)


def _distillation_share(logits, teacher_logits, labels, alpha, temperature, ce_rows, rows: slice) -> torch.Tensor:
    n = len(teacher_logits)
    kd = kd_logits(logits, teacher_logits[rows], temperature) * (len(logits) / n)
    if ce_rows is None and labels is not None:
        ce_rows = torch.ones(n, dtype=torch.bool, device=labels.device)
    if labels is None or not ce_rows.any():
        return kd
    mine = ce_rows[rows]
    loss = alpha * kd
    if mine.any():
        share = float(mine.sum()) / float(ce_rows.sum())
        loss = loss + (1 - alpha) * F.cross_entropy(logits[mine].float(), labels[rows][mine]) * share
    return loss


def autocast(device: torch.device | str, bf16: bool):
    """bfloat16 autocast on the model's device type when asked; a no-op context otherwise."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float = 1.0) -> None:
    """Backward, clip, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
