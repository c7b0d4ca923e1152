"""Fine-tune a sequence classifier on Encoded data (the demo's student; examples/train_student.py).

Plain AdamW with linear warmup/decay, optional logit distillation from cached teacher logits, dev
evaluation after each epoch keeping the best weights. Deterministic for a seed on CPU.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from .data import Encoded
from .similarity import predict_logits


def accuracy(model, data: Encoded, batch_size: int = 64) -> float:
    pred = predict_logits(model, data, batch_size).argmax(-1)
    return float((pred == data.labels).float().mean())


def train_classifier(model, train: Encoded, dev: Encoded | None = None, *, epochs: float = 1.0, lr: float = 1e-3,
                     batch_size: int = 32, warmup: float = 0.1, weight_decay: float = 0.01, seed: int = 0,
                     teacher_logits: torch.Tensor | None = None, alpha: float = 0.5, temperature: float = 3.0,
                     desc: str = "train") -> dict:
    """Train in place; returns {"steps", "seconds", "dev_accuracy": [...], "best_dev_accuracy"}.

    With `teacher_logits` (one row per training example), the loss is
    alpha·T²·KL(student/T ‖ teacher/T) + (1 − alpha)·CE(labels)."""
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(warmup * total), total)
    start, step, history = time.time(), 0, []
    best = (-1.0, None)
    bar = tqdm(total=total, desc=desc, unit="step")
    epoch = 0
    while step < total:
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for begin in range(0, len(train), batch_size):
            if step >= total:
                break
            idx = order[begin:begin + batch_size]
            batch = train.batch(idx)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss = F.cross_entropy(logits, labels)
            if teacher_logits is not None:
                t = temperature
                kd = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(teacher_logits[idx] / t, -1),
                              reduction="batchmean") * t * t
                loss = alpha * kd + (1 - alpha) * loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        epoch += 1
        if dev is not None:
            acc = accuracy(model, dev)
            history.append(acc)
            bar.set_postfix(loss=f"{loss.item():.3f}", dev=f"{acc:.4f}")
            if acc > best[0]:
                best = (acc, copy.deepcopy(model.state_dict()))
    bar.close()
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    return {"steps": step, "seconds": round(time.time() - start, 1), "dev_accuracy": history,
            "best_dev_accuracy": best[0] if best[1] is not None else None}
