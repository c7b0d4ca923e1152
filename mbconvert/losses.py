"""Knowledge-transfer losses for recovery, by name (a TextBrewer-style registry).

Every loss takes the student's tensors first and the teacher's second, plus `mask` (B, T) of real tokens
where tokens matter; padding never contributes. Names, as used by `RecoveryConfig.attention_loss`:

- ``hidden_mse``: feature-map transfer, MSE between layer outputs (optionally through a learned projection
  when the widths differ).
- ``relation_kl``: attention transfer that does not care about head counts (MiniLMv2). The q, k and v
  projections of each model are split into the same number of *relation heads*; the T×T self-relations
  softmax(x xᵀ/√d) are compared with KL(teacher ‖ student). Only T×T matrices meet, so the teacher's 8
  heads of 64 and a MobileBERT's 4 heads of 32 (or a value read from the 512-wide hidden state) compare
  directly. This is the default: it needs nothing from the conversion.
- ``attention_kl_mean_heads``: KL between head-averaged attention maps. Also head-count free, but averaging
  throws away what each head attends to; kept as a cheap baseline.
- ``attention_kl_mapped``: per-head attention KL where student head h is compared with the teacher head it
  was built from (``head_map``, from conversion.json's ``heads_kept``).
- ``kd_logits``: Hinton logit distillation, T²·KL(softmax(t/T) ‖ softmax(s/T)).

`ATTENTION_LOSSES` holds the attention losses as `AttentionLoss` entries that say what each reads from a layer and
which arguments it takes, so the training loop never branches on a loss's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError

Tensor = torch.Tensor


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor, projection: torch.nn.Module | None = None) -> Tensor:
    """Mean squared error per real token and feature: the MobileBERT paper's feature-map transfer."""
    if projection is not None:
        student = projection(student)
    if student.shape[-1] != teacher.shape[-1]:
        raise ConfigError(f"hidden widths differ ({student.shape[-1]} vs {teacher.shape[-1]}): a projection is needed")
    m = mask.unsqueeze(-1).to(student.dtype)
    return (((student - teacher.to(student.dtype)) ** 2) * m).sum() / (m.sum() * student.shape[-1]).clamp_min(1)


def masked_row_kl(log_p: Tensor, log_q: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """KL(p ‖ q) of each (B, H, query, key) row over real keys, averaged (or, reduction="sum", summed) over real
    query rows and heads. The one masked attention KL: recovery's losses and mbconvert.similarity use it."""
    keys = mask[:, None, None, :].bool()
    terms = torch.where(keys, log_p.exp() * (log_p - log_q), torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    kl = terms.sum(-1)  # (B, H, T)
    rows = mask[:, None, :].bool().expand_as(kl)
    return kl[rows].sum() if reduction == "sum" else kl[rows].mean()


def _relation_log_probs(x: Tensor, heads: int, mask: Tensor) -> Tensor:
    """log softmax(x_h x_hᵀ / √d) for `heads` slices of the feature axis: (B, T, D) → (B, heads, T, T)."""
    b, t, d = x.shape
    if d % heads:
        raise ConfigError(f"relation_heads={heads} does not divide the attention width {d}; choose a divisor")
    x = x.float().view(b, t, heads, d // heads).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def relation_kl(student: tuple[Tensor, Tensor, Tensor], teacher: tuple[Tensor, Tensor, Tensor], mask: Tensor,
                heads: int = 8) -> Tensor:
    """MiniLMv2 self-relation transfer, averaged over the query-query, key-key and value-value relations.

    `student`/`teacher` are the (q, k, v) projection outputs of one layer, each (B, T, width); the widths
    may differ between the models (and between q/k and v inside MobileBERT).
    """
    losses = [masked_row_kl(_relation_log_probs(t, heads, mask), _relation_log_probs(s, heads, mask), mask)
              for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def log_probs(attention: Tensor) -> Tensor:
    """log of attention probabilities in float32, zeros clamped to 1e-12 (finite, and 0·log 0 terms stay 0)."""
    return attention.float().clamp_min(1e-12).log()


def attention_kl_mean_heads(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """KL(teacher ‖ student) of head-averaged attention maps (B, H, T, T) → scalar."""
    return masked_row_kl(log_probs(teacher.mean(1, keepdim=True)), log_probs(student.mean(1, keepdim=True)), mask)


def attention_kl_mapped(student: Tensor, teacher: Tensor, mask: Tensor, head_map: list[int]) -> Tensor:
    """KL(teacher head head_map[h] ‖ student head h), averaged over the student's heads."""
    if len(head_map) != student.shape[1]:
        raise ConfigError(f"head map names {len(head_map)} heads but the student layer has {student.shape[1]}")
    if max(head_map) >= teacher.shape[1] or min(head_map) < 0:
        raise ConfigError(f"head map {head_map} names heads the teacher ({teacher.shape[1]} heads) lacks")
    chosen = teacher[:, list(head_map)]
    return masked_row_kl(log_probs(chosen), log_probs(student), mask)


def kd_logits(student: Tensor, teacher: Tensor, temperature: float = 3.0) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (T² keeps gradients T-independent)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


LOSSES = {
    "hidden_mse": hidden_mse,
    "relation_kl": relation_kl,
    "attention_kl_mean_heads": attention_kl_mean_heads,
    "attention_kl_mapped": attention_kl_mapped,
    "kd_logits": kd_logits,
}

@dataclass(frozen=True)
class AttentionLoss:
    """A registry entry: the loss, what it reads from a layer ("qkv": the query/key/value projections; "probs":
    attention probabilities, which need eager attention), and which run-time arguments it takes."""

    fn: Callable
    inputs: str
    uses_relation_heads: bool = False
    uses_head_map: bool = False

    def __call__(self, student, teacher, mask, *, relation_heads: int, head_map: list[int] | None):
        extra = {"heads": relation_heads} if self.uses_relation_heads else {}
        if self.uses_head_map:
            extra["head_map"] = head_map
        return self.fn(student, teacher, mask, **extra)


ATTENTION_LOSSES = {
    "relation_kl": AttentionLoss(relation_kl, "qkv", uses_relation_heads=True),
    "attention_kl_mean_heads": AttentionLoss(attention_kl_mean_heads, "probs"),
    "attention_kl_mapped": AttentionLoss(attention_kl_mapped, "probs", uses_head_map=True),
}


def attention_loss(name: str) -> AttentionLoss:
    """The attention-transfer loss called `name`, with a one-line error for unknown names."""
    if name not in ATTENTION_LOSSES:
        raise ConfigError(f"unknown attention loss {name!r} (choose one of {', '.join(ATTENTION_LOSSES)})")
    return ATTENTION_LOSSES[name]
