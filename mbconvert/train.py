"""Fine-tune a sequence classifier on Encoded data: the students that mbconvert converts (the demo's, and
examples/train_student.py's for the benchmarks).

The optimiser recipe is recovery's (mbconvert.optim: AdamW without decay on biases and norm weights, linear
warm-up/decay, the KD + CE mix, bfloat16 autocast), with optional logit distillation from cached teacher logits; dev
accuracy and macro-F1 after each epoch, the best epoch's weights kept. The batch order follows `seed`; the caller seeds torch's global generator (initial
weights, dropout), so a run is deterministic on CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time

import torch
from tqdm import tqdm

from . import optim
from .stats import classification_metrics
from .data import Encoded
from .similarity import inputs_for, predict_logits

log = logging.getLogger("mbconvert")


def scores(model, data: Encoded, num_labels: int) -> dict:
    """Accuracy and macro-F1 on labelled data, rounded to 4 digits."""
    m = classification_metrics(predict_logits(model, data).argmax(-1).tolist(), data.labels.tolist(),
                               [str(i) for i in range(num_labels)])
    return {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)}


def train_classifier(model, train: Encoded, dev: Encoded | None = None, *, epochs: float = 1.0, lr: float = 1e-3,
                     batch_size: int = 32, warmup: float = 0.1, weight_decay: float = 0.01, seed: int = 0,
                     teacher_logits: torch.Tensor | None = None, alpha: float = 0.5, temperature: float = 3.0,
                     bf16: bool = False, desc: str = "train") -> dict:
    """Train in place for `epochs` (fractions allowed) and keep the epoch with the best dev accuracy (the last
    one without dev data). Returns {"steps", "seconds", "history": [per epoch: step, dev scores, elapsed_s],
    "dev": best dev scores or None}.

    With `teacher_logits` (one row per training example) the loss is alpha·T²·KL + (1 − alpha)·CE."""
    num_labels = model.config.num_labels
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, int(epochs * steps_per_epoch))
    opt = torch.optim.AdamW(optim.param_groups(model.parameters(), lr, weight_decay))
    generator = torch.Generator().manual_seed(seed)
    start, step, history, best, best_state = time.time(), 0, [], None, None
    interval = 1 if sys.stderr.isatty() else 30
    for epoch in range(math.ceil(epochs)):
        model.train()
        order = torch.randperm(len(train), generator=generator)[: (total - step) * batch_size]
        bar = tqdm(order.split(batch_size), desc=f"{desc}: epoch {epoch + 1}", mininterval=interval, file=sys.stderr)
        for idx in bar:
            batch = train.batch(idx)
            optim.set_lr(opt, step / total, warmup)
            with optim.autocast(next(model.parameters()).device, bf16):
                logits = model(**inputs_for(model, batch)).logits.float()
            targets = teacher_logits[idx] if teacher_logits is not None else None
            loss = optim.distillation_loss(logits, targets, batch["labels"], alpha, temperature)
            optim.step(opt, loss)
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        dev_scores = scores(model, dev, num_labels) if dev is not None else None
        history.append({"epoch": epoch + 1, "step": step, "dev": dev_scores,
                        "elapsed_s": round(time.time() - start, 1)})
        log.info("%s: epoch %d, step %d, dev %s, %.0fs", desc, epoch + 1, step, dev_scores, time.time() - start)
        if dev_scores is None or best is None or dev_scores["accuracy"] > best["accuracy"]:
            best, best_state = dev_scores, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return {"steps": step, "seconds": round(time.time() - start, 1), "history": history, "dev": best}
