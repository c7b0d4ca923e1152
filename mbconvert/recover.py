"""Stage 3 — recover: repair the lossy mapping by training the MobileBERT against the original student.

MobileBERT's progressive knowledge transfer, adapted to a converted model:

1. Layer-wise stage, one layer at a time from the bottom. Layer l learns to reproduce the teacher's layer
   output (feature-map MSE) and its attention (default: MiniLMv2 q/k/v self-relations, which need no head
   correspondence, see mbconvert.losses). The layers below train at `lower_layer_lr_scale` × the LR (0
   freezes them, as the paper does). Both models run only up to the layer being trained.
2. Task stage: logit distillation `alpha·T²·KL + (1−alpha)·CE` (KL alone for unlabelled data). The
   teacher's logits are computed once for the whole training set, so this stage costs one MobileBERT.

Dev accuracy is measured before recovery, after the layer-wise stage and every `eval_every` task steps (of the
weights' moving average when `ema_decay` is set);
recovery stops once it is within `tolerance` of the teacher's (never with `tolerance=None`) and the best model
seen is kept (`keep="last"`: the final one — on a small dev set the best point is often noise).

Resumability: the batch of every step is a function of (seed, stage, step) and the checkpoint holds the
model, optimiser, RNG and progress, so a run stopped (Ctrl-C finishes the step and checkpoints first) and
resumed ends with exactly the weights of an uninterrupted run when the length is given in steps or epochs.
A time budget (`budget_s`) cannot be reproduced exactly: it depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import losses
from .config import RecoveryConfig
from .data import Encoded, load_encoded
from .errors import ConfigError, DataError, ShapeMismatchError
from .fileio import atomic_dir, safe_torch_load, write_json
from .similarity import predict_logits

log = logging.getLogger("mbconvert")
STATE_FILE = "recovery_state.pt"
SUMMARY_FILE = "recovery.json"
LOSS_SAMPLE_EVERY = 10  # steps averaged into one point of the loss curves in recovery.json
# options that may change between an interrupted run and its resumption without changing the result
RESUMABLE_CHANGES = ("threads", "device", "checkpoint_every_s", "progress", "stop_after_steps")


# -------------------------------------------------------------------- plan
@dataclass
class Stage:
    """One optimiser's worth of training: a layer of the layer-wise stage, or the task stage."""

    layer: int | None  # student layer trained; None for the task stage
    steps: int | None  # step allotment (None under a time budget)
    start_s: float | None = None  # budget mode: planned [start, deadline) in elapsed seconds
    deadline_s: float | None = None

    @property
    def kind(self) -> str:
        return "task" if self.layer is None else "layer-wise"


def plan_stages(cfg: RecoveryConfig, n_layers: int, n_rows: int) -> list[Stage]:
    """Split steps (or seconds) between the layers and the task stage by `layerwise_share`."""
    if not 0 <= cfg.layerwise_share <= 1:
        raise ConfigError(f"layerwise_share must be in [0, 1], not {cfg.layerwise_share}")
    if sum(x is not None for x in (cfg.budget_s, cfg.steps, cfg.epochs)) > 1:
        raise ConfigError("give one of budget, steps or epochs")
    if cfg.budget_s is not None:
        layer_s = cfg.budget_s * cfg.layerwise_share / n_layers
        stages = [Stage(i, None, i * layer_s, (i + 1) * layer_s) for i in range(n_layers)]
        return stages + [Stage(None, None, n_layers * layer_s, cfg.budget_s)]
    per_epoch = math.ceil(n_rows / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else math.ceil((cfg.epochs or 1.0) * per_epoch)
    if total < 1:
        raise ConfigError("recovery needs at least one step")
    layerwise = round(total * cfg.layerwise_share)
    stages = [Stage(i, layerwise // n_layers + (i < layerwise % n_layers)) for i in range(n_layers)]
    return [s for s in stages if s.steps] + [Stage(None, total - layerwise)]


def lr_scale(progress: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of a stage, then linear decay to zero."""
    if progress < warmup:
        return progress / warmup
    return max(0.0, (1.0 - progress) / max(1e-12, 1.0 - warmup))


@dataclass
class Progress:
    """Everything about a run's position and history; saved in checkpoints as primitives."""

    stage: int = 0
    stage_step: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    teacher_accuracy: float | None = None
    initial_accuracy: float | None = None
    best_accuracy: float | None = None
    best_step: int | None = None
    early_stopped: bool = False
    losses: dict = field(default_factory=lambda: {"layer-wise": [], "task": []})  # kind → [[step, loss]]
    work: dict = field(default_factory=lambda: {"layer-wise": [0, 0.0], "task": [0, 0.0]})  # kind → [steps, s]
    accuracy_curve: list = field(default_factory=list)  # [[step, seconds, accuracy]]
    loss_window: list = field(default_factory=list)


# -------------------------------------------------------------------- model plumbing
def _layers(model) -> torch.nn.ModuleList:
    return model.base_model.encoder.layer


@contextlib.contextmanager
def _first_layers(model, n: int):
    """Run only the bottom n encoder layers: the layer-wise stage never needs the layers above."""
    encoder = model.base_model.encoder
    full = encoder.layer
    encoder.layer = full[:n]
    try:
        yield
    finally:
        encoder.layer = full


class LayerTap:
    """Forward hooks keeping one attention layer's q/k/v projections or attention probabilities."""

    def __init__(self, layer, what: str):
        attention = layer.attention.self
        self.out: dict = {}
        if what == "qkv":
            modules = {n: getattr(attention, n) for n in ("query", "key", "value")}
        else:
            modules = {"probs": attention}
        self.handles = [m.register_forward_hook(self._keep(n)) for n, m in modules.items()]

    def _keep(self, name):
        def hook(_module, _inputs, output):
            self.out[name] = output[1] if name == "probs" else output
        return hook

    def value(self):
        if "probs" in self.out:
            return self.out["probs"]
        return tuple(self.out[n] for n in ("query", "key", "value"))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _teacher_layer(layer: int, n_student: int, n_teacher: int) -> int:
    """Uniform layer mapping when the depths differ (identity when they match)."""
    return round((layer + 1) * n_teacher / n_student) - 1


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model, data: Encoded, device, batch_size: int) -> torch.Tensor:
    was_training = model.training
    out = predict_logits(model, data, batch_size, device)
    model.train(was_training)
    return out


def teacher_logits(teacher, data: Encoded, device, batch_size: int, cache_dir=None) -> torch.Tensor:
    """The teacher's logits on every training row, computed once per (teacher, dataset) and kept in
    cache_dir: a second recovery on the same data (a resume, a benchmark's random-init run) reuses them."""
    if cache_dir is None:
        return _logits(teacher, data, device, batch_size)
    key = hashlib.sha256()
    for tensor in (*teacher.state_dict().values(), data.input_ids, data.attention_mask, data.token_type_ids):
        key.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir) / f"teacher-logits-{key.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True).to(device)
    out = _logits(teacher, data, device, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out.cpu(), tmp)
    os.replace(tmp, path)
    return out


def bucketed_batches(lengths: torch.Tensor, batch_size: int, seed: int, bucket: int) -> list[torch.Tensor]:
    """One epoch of batches: shuffle, sort each window of `bucket` batches by length, cut into batches and
    shuffle the batches. Batches are trimmed to their longest row, so similar lengths save most of the
    padding (AG News, 32 rows, window 50: mean padded width 103 → 55 tokens) at the cost of slightly less random batches;
    bucket ≤ 1 gives plain shuffled batches."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g)
    if bucket > 1:
        window = batch_size * bucket
        order = torch.cat([chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in order.split(window)])
    batches = list(order.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def mix_tokens(inputs: dict, rows: int, rate: float, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Data augmentation for distillation: in `rows` random rows of the batch, swap each real token with
    probability `rate` for a token drawn from the batch's real tokens (special tokens — the ids that open or close
    a row — and padding are never swapped or drawn). The teacher labels the mixed rows; the student learns its
    function around, not only at, the training texts. Returns the new inputs and the boolean mask of mixed rows."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n, width = ids.shape
    last = ids[torch.arange(n), mask.sum(1).clamp(min=1) - 1]
    real = mask.bool() & ~torch.isin(ids, torch.cat([ids[:, 0], last]))
    mixed = torch.zeros(n, dtype=torch.bool)
    pool = ids[real].cpu()
    if not len(pool):  # nothing to mix (rows of special tokens only)
        return inputs, mixed.to(ids.device)
    mixed[torch.randperm(n, generator=generator)[:rows]] = True
    swap = real.cpu() & mixed[:, None] & (torch.rand(n, width, generator=generator) < rate)
    drawn = pool[torch.randint(len(pool), (n, width), generator=generator)]
    new_ids = torch.where(swap.to(ids.device), drawn.to(ids.device), ids)
    return dict(inputs, input_ids=new_ids), mixed.to(ids.device)


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C sets a flag instead of raising mid-step, so the loop can checkpoint a consistent state."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits = []
    previous = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _groups(params: list, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only (not on biases and norm weights)."""
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return [dict(g, lr=lr, base_lr=lr) for g in groups if g["params"]]


# -------------------------------------------------------------------- the run
class Recovery:
    """One recovery run: plan, training loop, evaluation, checkpoints and the summary."""

    def __init__(self, student, teacher, train: Encoded, cfg: RecoveryConfig, eval_data: Encoded | None,
                 out_dir: Path | None, head_map: list[list[int]] | None, cache_dir=None):
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device).eval()
        self.train, self.eval_data, self.out_dir = train, eval_data, out_dir
        self.head_map = head_map
        self.attention_loss = losses.attention_loss(cfg.attention_loss)
        self.attention_inputs = losses.ATTENTION_INPUTS[cfg.attention_loss]
        if cfg.attention_loss == "attention_kl_mapped" and head_map is None:
            raise ConfigError("attention_loss='attention_kl_mapped' needs the head map from conversion.json")
        if self.attention_inputs == "probs":  # only eager attention materialises the probabilities
            for model in (self.student, self.teacher):
                model.set_attn_implementation("eager")
        self.n_layers = len(_layers(student))
        self.stages = plan_stages(cfg, self.n_layers, len(train))
        torch.manual_seed(cfg.seed)
        self.projections = self._projections()
        self.p = Progress()
        self.best_state: dict | None = None
        self.ema: list[torch.Tensor] | None = None  # task stage: moving average of the parameters (ema_decay)
        self.teacher_logits: torch.Tensor | None = None
        self.teacher_eval_logits: torch.Tensor | None = None
        self._order_key, self._order = None, None
        self._clock = self._last_checkpoint = time.monotonic()

    # ---------------------------------------------------------------- setup
    def _projections(self) -> torch.nn.ModuleList | None:
        """Learned student→teacher width maps for the feature-map loss, only when the widths differ."""
        s, t = self.student.config.hidden_size, self.teacher.config.hidden_size
        if s == t:
            return None
        return torch.nn.ModuleList(torch.nn.Linear(s, t, bias=False) for _ in range(self.n_layers)).to(self.device)

    @property
    def elapsed(self) -> float:
        return self.p.elapsed_s + time.monotonic() - self._clock

    def _fingerprint(self) -> str:
        options = {k: v for k, v in self.cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
        return json.dumps([options, len(self.train), len(self.eval_data) if self.eval_data is not None else 0])

    def _batch(self, stage_index: int, stage_step: int) -> tuple[torch.Tensor, dict]:
        """The rows of a step: a seeded, length-bucketed shuffle per (stage, epoch), so any step can be replayed."""
        per_epoch = math.ceil(len(self.train) / self.cfg.batch_size)
        epoch, pos = divmod(stage_step, per_epoch)
        key = (stage_index, epoch)
        if key != self._order_key:
            seed = self.cfg.seed * 1_000_003 + stage_index * 10_007 + epoch
            self._order_key, self._order = key, bucketed_batches(self.train.attention_mask.sum(1), self.cfg.batch_size,
                                                                 seed, self.cfg.bucket_batches)
        idx = self._order[pos]
        return idx, {k: v.to(self.device) for k, v in self.train.batch(idx).items()}

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self) -> float | None:
        """Dev accuracy (agreement with the teacher when the dev data has no labels)."""
        if self.eval_data is None:
            return None
        pred = _logits(self.student, self.eval_data, self.device, 2 * self.cfg.batch_size).argmax(-1)
        return float((pred == self._eval_reference()).float().mean())

    def _teacher_eval_logits(self) -> torch.Tensor:
        """Cached like the training logits: a resume or a second recovery on the same dev data reuses them."""
        return teacher_logits(self.teacher, self.eval_data, self.device, 2 * self.cfg.batch_size, self.cache_dir)

    def _eval_reference(self) -> torch.Tensor:
        if self.eval_data.labels is not None:
            return self.eval_data.labels.to(self.device)
        return self.teacher_eval_logits.argmax(-1)

    def _record_evaluation(self) -> None:
        """Evaluate the model (its moving average under ema_decay) and keep it when it is the best so far."""
        with self._ema_weights():
            acc = self._evaluate()
            if acc is None:
                return
            p = self.p
            p.accuracy_curve.append([p.step, round(self.elapsed, 2), acc])
            if p.best_accuracy is None or acc > p.best_accuracy:
                p.best_accuracy, p.best_step = acc, p.step
                if self.cfg.keep == "best":
                    self.best_state = {k: v.detach().to("cpu", copy=True)
                                       for k, v in self.student.state_dict().items()}
        if self.cfg.tolerance is not None and acc >= p.teacher_accuracy - self.cfg.tolerance:
            p.early_stopped = True

    def _start(self) -> None:
        """Fresh run: the teacher's dev accuracy and the unrecovered model's, once."""
        if self.eval_data is not None:
            self.teacher_eval_logits = self._teacher_eval_logits()
            reference = self._eval_reference()
            self.p.teacher_accuracy = float((self.teacher_eval_logits.argmax(-1) == reference).float().mean())
            self._record_evaluation()
            self.p.initial_accuracy = self.p.accuracy_curve[-1][2]

    # ---------------------------------------------------------------- weight averaging
    @contextlib.contextmanager
    def _ema_weights(self):
        """Swap the averaged parameters in (when ema_decay is set and the task stage has begun)."""
        if self.ema is None:
            yield
            return
        params = [p for p in self.student.parameters()]
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, current)

    def _update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.student.parameters()],
                                     1.0 - self.cfg.ema_decay)

    # ---------------------------------------------------------------- steps
    def _layer_loss(self, stage: Stage, batch: dict, taps: tuple[LayerTap, LayerTap]) -> torch.Tensor:
        """Feature-map MSE + attention transfer at one layer; both models stop at that layer."""
        inputs, mask = _inputs(batch), batch["attention_mask"]
        t_layer = _teacher_layer(stage.layer, self.n_layers, len(_layers(self.teacher)))
        with torch.no_grad(), _first_layers(self.teacher, t_layer + 1):
            t_hidden = self.teacher.base_model(**inputs).last_hidden_state
        with _first_layers(self.student, stage.layer + 1):
            s_hidden = self.student.base_model(**inputs).last_hidden_state
        projection = self.projections[stage.layer] if self.projections is not None else None
        loss = self.cfg.hidden_weight * losses.hidden_mse(s_hidden, t_hidden, mask, projection)
        if self.cfg.attention_weight:
            extra = {"heads": self.cfg.relation_heads} if self.attention_inputs == "qkv" else {}
            if self.cfg.attention_loss == "attention_kl_mapped":
                extra = {"head_map": self.head_map[stage.layer]}
            student_tap, teacher_tap = taps
            loss = loss + self.cfg.attention_weight * self.attention_loss(student_tap.value(), teacher_tap.value(),
                                                                          mask, **extra)
        return loss

    def _task_loss(self, idx: torch.Tensor, batch: dict) -> torch.Tensor:
        """alpha·KD + (1−alpha)·CE against cached teacher logits; KD alone without labels. With mix_rows, some
        rows are token-mixed (mix_tokens) and distilled from the teacher's live logits, without CE."""
        inputs, targets = _inputs(batch), self.teacher_logits[idx.to(self.device)]
        clean = None
        rows = round(self.cfg.mix_rows * len(idx))
        if rows:
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_033 + self.p.step)
            inputs, mixed = mix_tokens(inputs, rows, self.cfg.mix_tokens, generator)
            if mixed.any():
                with torch.no_grad():
                    live = self.teacher(**{k: v[mixed] for k, v in inputs.items()}).logits.float()
                targets = targets.clone()
                targets[mixed] = live
                clean = ~mixed
        logits = self.student(**inputs).logits
        kd = losses.kd_logits(logits, targets, self.cfg.temperature)
        if "labels" not in batch or (clean is not None and not clean.any()):
            return kd
        labelled = logits if clean is None else logits[clean]
        labels = batch["labels"] if clean is None else batch["labels"][clean]
        return self.cfg.alpha * kd + (1 - self.cfg.alpha) * F.cross_entropy(labelled.float(), labels)

    def _optimizer(self, stage: Stage) -> tuple[torch.optim.Optimizer, list]:
        """AdamW for a stage, and the parameters it freezes (restored when the stage ends)."""
        cfg = self.cfg
        if stage.layer is None:
            return torch.optim.AdamW(_groups(list(self.student.parameters()), cfg.lr, cfg.weight_decay)), []
        top = list(_layers(self.student)[stage.layer].parameters())
        if self.projections is not None:
            top += list(self.projections[stage.layer].parameters())
        lower = list(self.student.base_model.embeddings.parameters())
        lower += [p for layer in _layers(self.student)[:stage.layer] for p in layer.parameters()]
        groups = _groups(top, cfg.layerwise_lr, cfg.weight_decay)
        frozen = []
        if cfg.lower_layer_lr_scale > 0:
            groups += _groups(lower, cfg.layerwise_lr * cfg.lower_layer_lr_scale, cfg.weight_decay)
        else:
            frozen = [p for p in lower if p.requires_grad]
        return torch.optim.AdamW(groups), frozen

    def _stage_progress(self, stage: Stage) -> float:
        if stage.steps is not None:
            return self.p.stage_step / stage.steps
        return (self.elapsed - stage.start_s) / max(1e-9, stage.deadline_s - stage.start_s)

    def _stage_over(self, stage: Stage) -> bool:
        if stage.steps is not None:
            return self.p.stage_step >= stage.steps
        return self.elapsed >= stage.deadline_s

    def _train_step(self, index: int, stage: Stage, optimizer, taps) -> float:
        scale = lr_scale(min(1.0, self._stage_progress(stage)), self.cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        idx, batch = self._batch(index, self.p.stage_step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            loss = self._task_loss(idx, batch) if stage.layer is None else self._layer_loss(stage, batch, taps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        if stage.layer is None:
            self._update_ema()
        return float(loss.detach())

    def _log_loss(self, kind: str, loss: float) -> None:
        p = self.p
        p.loss_window.append(loss)
        if len(p.loss_window) == LOSS_SAMPLE_EVERY:
            p.losses[kind].append([p.step, sum(p.loss_window) / len(p.loss_window)])
            p.loss_window = []

    def _flush_losses(self, kind: str) -> None:
        if self.p.loss_window:
            self.p.losses[kind].append([self.p.step, sum(self.p.loss_window) / len(self.p.loss_window)])
            self.p.loss_window = []

    # ---------------------------------------------------------------- checkpoints
    def _save(self, optimizer) -> None:
        if self.out_dir is None:
            return
        progress = dataclasses.asdict(self.p) | {"elapsed_s": self.elapsed}
        state = {"fingerprint": self._fingerprint(), "model": self.student.state_dict(),
                 "optimizer": optimizer.state_dict(), "progress": progress,
                 "rng": torch.get_rng_state(), "best": self.best_state or {}, "ema": self.ema or [],
                 "projections": self.projections.state_dict() if self.projections is not None else {}}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out_dir / STATE_FILE)
        self._last_checkpoint = time.monotonic()

    def _load(self) -> dict | None:
        """Restore a checkpoint; returns the optimiser state of the stage it stopped in."""
        path = self.out_dir / STATE_FILE if self.out_dir is not None else None
        if path is None or not path.is_file():
            log.info("no %s to resume from: starting recovery from the beginning", STATE_FILE)
            return None
        state = safe_torch_load(path)
        if state.get("fingerprint") != self._fingerprint():
            raise ConfigError(f"{path} was written with other recovery options or data; rerun without --resume "
                              "to start over")
        self.student.load_state_dict(state["model"])
        if self.projections is not None:
            self.projections.load_state_dict(state["projections"])
        self.p = Progress(**state["progress"])
        self.best_state = state["best"] or None
        self.ema = [t.to(self.device) for t in state.get("ema", [])] or None
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        log.info("resuming recovery at step %d", self.p.step)
        return state["optimizer"]

    # ---------------------------------------------------------------- driver
    def run(self, resume: bool) -> dict:
        optimizer_state = self._load() if resume else None
        if optimizer_state is None:
            self._start()
        elif self.eval_data is not None:
            self.teacher_eval_logits = self._teacher_eval_logits()
        self.student.train()
        self._last_checkpoint = time.monotonic()
        bar, kind = None, None
        try:
            with _deferred_interrupt() as interrupted:
                for index in range(self.p.stage, len(self.stages)):
                    if self.p.early_stopped:
                        break
                    stage = self.stages[index]
                    if stage.kind != kind:
                        bar, kind = self._open_bar(bar, index), stage.kind
                    self._run_stage(index, stage, optimizer_state, bar, interrupted)
                    optimizer_state = None
        finally:
            if bar is not None:
                bar.close()
        return self._finish()

    def _open_bar(self, previous, index: int):
        if previous is not None:
            previous.close()
        stage = self.stages[index]
        same = [s for s in self.stages if s.kind == stage.kind]
        total = sum(s.steps for s in same) if stage.steps is not None else None
        done = sum(s.steps for s in self.stages[:index] if s.kind == stage.kind) if total else 0
        return tqdm(total=total, initial=done + self.p.stage_step, desc=f"recovery: {stage.kind}", unit="step",
                    disable=not self.cfg.progress, dynamic_ncols=True, leave=True)

    def _run_stage(self, index: int, stage: Stage, optimizer_state, bar, interrupted) -> None:
        if index != self.p.stage:
            self.p.stage, self.p.stage_step = index, 0
        optimizer, frozen = self._optimizer(stage)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        if stage.layer is None and self.teacher_logits is None:
            self.teacher_logits = teacher_logits(self.teacher, self.train, self.device, 2 * self.cfg.batch_size,
                                                 self.cache_dir)
        taps = self._taps(stage)
        if stage.layer is None and self.cfg.ema_decay is not None and self.ema is None:
            self.ema = [p.detach().clone() for p in self.student.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        try:
            if stage.layer is None and self.p.stage_step == 0:
                self._record_evaluation()  # after the layer-wise stage
            while not self._stage_over(stage) and not self.p.early_stopped:
                started = time.monotonic()
                loss = self._train_step(index, stage, optimizer, taps)
                self._after_step(stage, loss, time.monotonic() - started, bar)
                stop = interrupted() or (self.cfg.stop_after_steps is not None
                                         and self.p.step >= self.cfg.stop_after_steps)
                if stop or time.monotonic() - self._last_checkpoint >= self.cfg.checkpoint_every_s:
                    self._save(optimizer)
                if stop:
                    raise KeyboardInterrupt
            self._flush_losses(stage.kind)
        finally:
            for tap in taps:
                tap.remove()
            for p in frozen:
                p.requires_grad_(True)

    def _taps(self, stage: Stage) -> tuple:
        """Hooks on the student's trained layer and its teacher layer, for the attention loss."""
        if stage.layer is None or not self.cfg.attention_weight:
            return ()
        t_layer = _teacher_layer(stage.layer, self.n_layers, len(_layers(self.teacher)))
        return (LayerTap(_layers(self.student)[stage.layer], self.attention_inputs),
                LayerTap(_layers(self.teacher)[t_layer], self.attention_inputs))

    def _after_step(self, stage: Stage, loss: float, seconds: float, bar) -> None:
        """Count the step, sample the loss curve, evaluate when due, update the progress bar."""
        p = self.p
        p.stage_step += 1
        p.step += 1
        self._log_loss(stage.kind, loss)
        p.work[stage.kind][0] += 1
        p.work[stage.kind][1] += seconds
        if stage.layer is None and (p.stage_step % self.cfg.eval_every == 0 or self._stage_over(stage)):
            self._record_evaluation()
        bar.update(1)
        where = f"layer {stage.layer}, " if stage.layer is not None else ""
        bar.set_postfix_str(f"{where}loss {loss:.4f}{self._acc_text()}", refresh=False)

    def _acc_text(self) -> str:
        if not self.p.accuracy_curve:
            return ""
        return f", acc {self.p.accuracy_curve[-1][2]:.4f} (teacher {self.p.teacher_accuracy:.4f})"

    def _finish(self) -> dict:
        """Restore the best model, write recovery.json, print the summary line."""
        if self.best_state is not None:
            self.student.load_state_dict(self.best_state)
        elif self.ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(self.student.parameters()), self.ema)
        self.student.eval()
        summary = self._summary()
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / SUMMARY_FILE, summary)
            (self.out_dir / STATE_FILE).unlink(missing_ok=True)
        print(summary_line(summary))
        return summary

    def _summary(self) -> dict:
        p = self.p
        return {
            "metric": "accuracy" if self.eval_data is None or self.eval_data.labels is not None else "agreement",
            "teacher_accuracy": p.teacher_accuracy, "initial_accuracy": p.initial_accuracy,
            "final_accuracy": p.best_accuracy if self.cfg.keep == "best" or not p.accuracy_curve
            else p.accuracy_curve[-1][2], "best_accuracy": p.best_accuracy, "best_step": p.best_step, "steps": p.step,
            "early_stopped": p.early_stopped, "wall_s": round(self.elapsed, 2), "device": str(self.device),
            "stages": {kind: {"steps": p.work[kind][0], "seconds": round(p.work[kind][1], 2), "loss": curve}
                       for kind, curve in p.losses.items()},
            "accuracy_curve": p.accuracy_curve, "train_rows": len(self.train),
            "eval_rows": len(self.eval_data) if self.eval_data is not None else 0, "config": self.cfg.to_dict(),
        }


def format_duration(seconds: float) -> str:
    """6m41s, 42s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def summary_line(summary: dict) -> str:
    """`accuracy 0.9772 vs teacher 0.9785 (−0.13 pt), 6m41s`."""
    took = format_duration(summary["wall_s"])
    if summary["final_accuracy"] is None:
        return f"recovered for {summary['steps']} steps, {took} (no eval data: accuracy not measured)"
    acc, teacher = summary["final_accuracy"], summary["teacher_accuracy"]
    diff = 100 * (acc - teacher)
    sign = "−" if diff < 0 else "+"
    return f"{summary['metric']} {acc:.4f} vs teacher {teacher:.4f} ({sign}{abs(diff):.2f} pt), {took}"


# -------------------------------------------------------------------- public API
def _check_data(data: Encoded, what: str, num_labels: int) -> None:
    if data is None or len(data) == 0:
        raise DataError(f"the {what} data has no rows")
    labels = data.labels
    if labels is not None and not 0 <= int(labels.min()) <= int(labels.max()) < num_labels:
        raise DataError(f"the {what} data has label ids outside 0..{num_labels - 1}")


def recover(mobilebert, teacher, train_data: Encoded, config: RecoveryConfig | None = None,
            eval_data: Encoded | None = None, out_dir=None, resume: bool = False,
            head_map: list[list[int]] | None = None, cache_dir=None) -> dict:
    """Train `mobilebert` (in place) against `teacher`; returns the summary (also out_dir/recovery.json).

    `train_data`/`eval_data` are tokenised with the teacher's tokenizer (labels optional). `out_dir` holds
    the checkpoint that `resume=True` continues from. `head_map[l]` lists, for each MobileBERT head of layer
    l, the teacher head it came from (only `attention_loss='attention_kl_mapped'` uses it). `cache_dir` keeps
    the teacher's logits on the training data for the next recovery on the same data. On return the
    model holds the best weights seen on the dev data (the last ones without dev data or with keep="last").
    """
    cfg = config or RecoveryConfig()
    n_labels = mobilebert.config.num_labels
    if teacher.config.num_labels != n_labels:
        raise ShapeMismatchError(f"the teacher has {teacher.config.num_labels} classes, the MobileBERT {n_labels}")
    _check_data(train_data, "training", n_labels)
    if eval_data is not None:
        _check_data(eval_data, "eval", n_labels)
    if cfg.keep not in ("best", "last"):
        raise ConfigError(f"keep must be 'best' or 'last', not {cfg.keep!r}")
    if not (0 <= cfg.mix_rows <= 1 and 0 <= cfg.mix_tokens <= 1):
        raise ConfigError(f"mix_rows and mix_tokens are shares in [0, 1], not {cfg.mix_rows} and {cfg.mix_tokens}")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay <= 1:
        raise ConfigError(f"ema_decay must be in (0, 1], not {cfg.ema_decay}")
    if cfg.stop_after_steps is not None and out_dir is None:
        raise ConfigError("stop_after_steps needs an out_dir to checkpoint into")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Recovery(mobilebert, teacher, train_data, cfg, eval_data, Path(out_dir) if out_dir else None, head_map,
                   cache_dir)
    return run.run(resume)


def head_map_from(model_dir) -> list[list[int]] | None:
    """Per layer, the teacher heads the converter kept (conversion.json), if it says."""
    path = Path(model_dir) / "conversion.json"
    if not path.is_file():
        return None
    layers = json.loads(path.read_text(encoding="utf-8")).get("layers")
    if not isinstance(layers, list):
        return None
    kept = [(layer.get("attention") or {}).get("heads_kept", layer.get("heads_kept")) for layer in layers]
    return kept if all(isinstance(k, list) for k in kept) else None


def recover_checkpoint(model_dir, teacher_path, train_path, eval_path=None, config: RecoveryConfig | None = None,
                       out_dir=None, resume: bool = False, tokenizer=None) -> dict:
    """`mbconvert recover`: load a converted folder and its teacher, recover, save (default: in place)."""
    from .load import load_classifier, load_student

    cfg = config or RecoveryConfig()
    out = Path(out_dir or model_dir)
    model, tok = load_classifier(model_dir, tokenizer=tokenizer)
    source = load_student(teacher_path, tokenizer=tokenizer, require_tokenizer=tok is None)
    tok = tok or source.tokenizer
    cache = out / "cache"
    train = load_encoded(train_path, tok, model.config, max_length=cfg.max_length, cache_dir=cache)
    eval_data = (load_encoded(eval_path, tok, model.config, max_length=cfg.max_length, cache_dir=cache)
                 if eval_path else None)
    head_map = head_map_from(model_dir) if cfg.attention_loss == "attention_kl_mapped" else None
    summary = recover(model, source.model, train, cfg, eval_data, out_dir=out, resume=resume, head_map=head_map,
                      cache_dir=cache)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        write_json(tmp / SUMMARY_FILE, summary)
    log.info("wrote %s", out)
    return summary
