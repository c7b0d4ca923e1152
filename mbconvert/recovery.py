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
recovery stops once it is within `tolerance` points of the teacher's (never with `tolerance=None`) and the best model
seen is kept (`keep="last"`: the final one — on a small dev set the best point is often noise).

Resumability: the batch of every step is a function of (seed, stage, step) and the checkpoint holds the
model, optimiser, RNG and progress, so a run stopped (Ctrl-C finishes the step and checkpoints first) and
resumed ends with exactly the weights of an uninterrupted run when the length is given in steps or epochs.
A time budget (`budget_s`) cannot be reproduced exactly: it depends on the machine's speed.

Several processes (`torchrun`, `accelerate launch`; mbconvert.distributed): the same run as DDP. Every process builds
the same global batch and trains on its share of the rows, the source's logits and the dev evaluation are computed
in shares and gathered, and every decision (stop, checkpoint, a time budget's clock) is taken together; the main
process writes the checkpoint. The weights are one process's to float tolerance, but for dropout: each process draws
its own masks (seeded by step and process, so a resume still replays them).

This module is the loop; the plan and the run's position (Stage, plan_stages, Progress) are in
mbconvert.recovery_plan, and what a step computes and trains (losses, layer taps, optimisers) in mbconvert.transfer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, distributed, optim
from .cache import model_key
from .config import RecoveryConfig, RunOptions
from .corpus import Corpus, data_key
from .data import UNLABELLED, Encoded, bucketed_batches
from .errors import ConfigError, DataError, ShapeMismatchError, TrainingDivergedError
from .recovery_plan import Progress, Stage, plan_stages
from .similarity import predict_logits
from .transfer import Transfer

log = logging.getLogger("mbconvert")
SUMMARY_FILE = "recovery.json"
FEW_STEPS = 10  # a recovery that trained fewer steps than this says so loudly


# -------------------------------------------------------------------- helpers
def _logits(model, data: Encoded, device, batch_size: int, desc: str = "") -> torch.Tensor:
    was_training = model.training
    out = predict_logits(model, data, batch_size, device, desc=desc)
    model.train(was_training)
    return out


def teacher_logits(teacher, data: Encoded, device, batch_size: int, cache_dir=None, desc: str = "",
                   keys: tuple[str, str] | None = None, group: distributed.Group = distributed.SINGLE) -> torch.Tensor:
    """The teacher's logits on every row, computed once per (teacher, dataset) and kept in the cache (outside the
    output folder): a resume or a second recovery on the same data reuses them. `keys`: the (teacher, data) content
    keys when the caller has them already (hashing a large model twice costs seconds). `group`: several processes
    compute a share of the rows each and gather them. A streamed Corpus (mbconvert.corpus) gets a CPU tensor over a
    memory-mapped file in the cache, the same logits bit for bit."""
    from .cache import cache_root, model_key

    teacher_key, rows_key = keys or (model_key(teacher), data_key(data))
    if isinstance(data, Corpus):
        return data.logits(teacher, device, batch_size, cache_root(cache_dir) / f"teacher-logits-{teacher_key}-"
                           f"{rows_key}.npy", group, desc if group.main else "")

    def compute():
        return {"logits": group.map_rows(data, lambda part: _logits(teacher, part, device, batch_size,
                                                                    desc if group.main else ""))}

    key = f"{teacher_key}-{rows_key}"
    return distributed.cached(group, cache_dir, "teacher-logits", key, compute)["logits"].to(device)


def targets_key(teacher_key: str, logits_keys: tuple[str, str] | None = None) -> str:
    """The teacher's part of a run's fingerprint: its content key, and the (model, rows) keys of `logits_from`."""
    return teacher_key if logits_keys is None else f"{teacher_key}+logits:{logits_keys[0]}-{logits_keys[1]}"


@contextlib.contextmanager
def _deferred_interrupt(signals=(signal.SIGINT,)):
    """Ctrl-C (and any of `signals`) sets a flag instead of raising mid-step, so the loop can checkpoint a consistent
    state."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits = []
    previous = {s: signal.signal(s, lambda *_: hits.append(1)) for s in signals}
    try:
        yield lambda: bool(hits)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -------------------------------------------------------------------- the run
class Recovery:
    """One recovery run: plan, training loop, evaluation, checkpoints and the summary."""

    def __init__(self, student, teacher, train: Encoded, cfg: RecoveryConfig, eval_data: Encoded | None,
                 out_dir: Path | None, head_map: list[list[int]] | None, run: RunOptions, logits_from=None):
        self.cfg, self.run_options = cfg, run
        self.cache_dir = run.cache_dir
        self.device = torch.device(run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.group = distributed.process_group()  # several processes under torchrun / accelerate launch
        self.device = self.group.local(self.device)
        self.keys = {"teacher": model_key(teacher), "train": data_key(train),
                     "eval": data_key(eval_data)}  # content keys, hashed once per run
        self.logits_from = logits_from
        if logits_from is not None:
            self.keys["logits"] = (model_key(logits_from[0]), data_key(logits_from[1]))
        targets = targets_key(self.keys["teacher"], self.keys.get("logits"))
        self.fingerprint = checkpoint.fingerprint(cfg.to_dict(), targets, model_key(student), self.keys["train"],
                                                  self.keys["eval"])
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device).eval()
        self.train, self.eval_data, self.out_dir = train, eval_data, out_dir
        self.transfer = Transfer(self.student, self.teacher, cfg, head_map)  # checks the loss; eager attention
        self.n_layers = self.transfer.n_layers
        self.stages = plan_stages(cfg, self.n_layers, len(train))
        torch.manual_seed(cfg.seed)
        self.projections = self.transfer.add_projections(self.device)  # random init: after the seed
        self.p = Progress()
        self.best_state: dict | None = None
        self.ema: list[torch.Tensor] | None = None  # task stage: moving average of the parameters (ema_decay)
        self.teacher_logits: torch.Tensor | None = None
        self.teacher_eval_logits: torch.Tensor | None = None
        self._order_key, self._order = None, None
        self._clock = self._last_checkpoint = time.monotonic()
        self._agreed_elapsed: float | None = None  # several processes: the clock they agreed on at the last step

    # ---------------------------------------------------------------- setup
    @property
    def elapsed(self) -> float:
        if self._agreed_elapsed is not None:  # several processes take every time-based decision together
            return self._agreed_elapsed
        return self.p.elapsed_s + time.monotonic() - self._clock

    def _agree(self, stop: bool, due: bool) -> tuple[bool, bool]:
        """Several processes: stop or checkpoint when any of them says so, and take the slowest one's clock."""
        if self.group.size == 1:
            return stop, due
        self._agreed_elapsed = None
        stop, due, self._agreed_elapsed = self.group.max(float(stop), float(due), self.elapsed)
        return bool(stop), bool(due)

    def _batch(self, stage_index: int, stage_step: int) -> tuple[torch.Tensor, dict]:
        """The rows of a step: a seeded, length-bucketed shuffle per (stage, epoch), so any step can be replayed."""
        per_epoch = math.ceil(len(self.train) / self.cfg.batch_size)
        epoch, pos = divmod(stage_step, per_epoch)
        key = (stage_index, epoch)
        if key != self._order_key:
            seed = self.cfg.seed * 1_000_003 + stage_index * 10_007 + epoch
            self._order_key, self._order = key, bucketed_batches(self.train.lengths, self.cfg.batch_size,
                                                                 seed, self.cfg.bucket_batches)
        idx = self._order[pos]
        return idx, {k: v.to(self.device) for k, v in self.train.batch(idx).items()}

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self) -> float | None:
        """Dev accuracy (agreement with the teacher when the dev data has no labels)."""
        if self.eval_data is None:
            return None
        pred = self.group.map_rows(self.eval_data, lambda part: _logits(self.student, part, self.device,
                                                                        2 * self.cfg.batch_size)).argmax(-1)
        return float((pred == self._eval_reference()).float().mean())

    def _teacher_eval_logits(self) -> torch.Tensor:
        """Cached like the training logits: a resume or a second recovery on the same dev data reuses them."""
        return teacher_logits(self.teacher, self.eval_data, self.device, 2 * self.cfg.batch_size, self.cache_dir,
                              keys=(self.keys["teacher"], self.keys["eval"]), group=self.group)

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
        if self.cfg.tolerance is not None and acc >= p.source_accuracy - self.cfg.tolerance / 100:
            p.early_stopped = True

    def _start(self) -> None:
        """Fresh run: the teacher's dev accuracy and the unrecovered model's, once."""
        if self.eval_data is not None:
            self.teacher_eval_logits = self._teacher_eval_logits()
            reference = self._eval_reference()
            self.p.source_accuracy = float((self.teacher_eval_logits.argmax(-1) == reference).float().mean())
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
    def _train_step(self, index: int, stage: Stage, optimizer, taps, ddp=None) -> float:
        """One step; `ddp` (several processes): the DDP-wrapped student, and this process runs its share of the
        batch's rows, its loss being that share of the batch's loss."""
        optim.set_lr(optimizer, stage.fraction_done(self.p.stage_step, self.elapsed), self.cfg.warmup_ratio)
        idx, batch = self._batch(index, self.p.stage_step)
        rows = self.group.rows(len(idx)) if ddp is not None else None
        if ddp is not None:  # dropout: a stream of its own for each process and step, so a resume replays it
            torch.manual_seed((self.cfg.seed * 1_000_003 + self.p.step) * 1_009 + self.group.rank)

        def loss_fn():
            if stage.layer is None:
                targets = self.teacher_logits[idx.to(self.teacher_logits.device)].to(self.device)  # streamed: CPU
                return self.transfer.task_loss(batch, targets, self.p.step, rows)
            return self.transfer.layer_loss(stage.layer, batch, taps, rows)

        with optim.autocast(self.device, self.cfg.bf16):
            loss = loss_fn() if ddp is None else ddp(loss_fn)
        total = self.group.sum(loss.detach())  # the whole batch's loss (the sum of the shares)
        if not torch.isfinite(total):
            raise TrainingDivergedError(
                f"recovery diverged: the {stage.kind} loss is {float(total)} at step {self.p.step + 1} "
                f"(learning rate {self.cfg.lr if stage.layer is None else self.cfg.layerwise_lr:g}, temperature "
                f"{self.cfg.temperature:g}); nothing was saved — lower the learning rate")
        optim.step(optimizer, loss if ddp is None else loss * self.group.size)  # DDP averages the gradients
        if stage.layer is None:
            self._update_ema()
        return float(total)

    # ---------------------------------------------------------------- checkpoints
    def _save(self, optimizer) -> None:
        if self.out_dir is None:
            return
        if not self.group.main:  # the main process writes; the others wait until it has
            self.group.barrier()
            return
        progress = dataclasses.asdict(self.p) | {"elapsed_s": self.elapsed}
        state = {"fingerprint": self.fingerprint, "model": self.student.state_dict(),
                 "optimizer": optimizer.state_dict(), "progress": progress,
                 "rng": torch.get_rng_state(), "best": self.best_state or {}, "ema": self.ema or [],
                 "projections": self.projections.state_dict() if self.projections is not None else {}}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        checkpoint.save_state(self.out_dir, state)
        self.group.barrier()
        self._last_checkpoint = time.monotonic()

    def _load(self) -> dict | None:
        """Restore a checkpoint; returns the optimiser state of the stage it stopped in."""
        state = checkpoint.load_state(self.out_dir, self.fingerprint)
        if all(self.group.max(float(state is None), float(state is not None))):
            raise ConfigError(f"--resume: some processes cannot read {self.out_dir / checkpoint.STATE_FILE}; every "
                              "process must see the output folder (a shared file system)")
        if state is None:
            log.info("no %s to resume from: starting recovery from the beginning", checkpoint.STATE_FILE)
            return None
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
        # the teacher's logits are computed before the clock starts: a time budget is spent on training only
        started = time.monotonic()
        model, rows, keys = (self.teacher, self.train, (self.keys["teacher"], self.keys["train"])) \
            if self.logits_from is None else (*self.logits_from, self.keys["logits"])
        self.teacher_logits = teacher_logits(model.to(self.device).eval(), rows, self.device, 2 * self.cfg.batch_size,
                                             self.cache_dir, desc="source logits (training data)", keys=keys,
                                             group=self.group)
        self.teacher_logits_s = round(time.monotonic() - started, 2)  # ~0 when read back from the cache
        if self.eval_data is not None:
            self.teacher_eval_logits = self._teacher_eval_logits()
        self._clock = time.monotonic()
        if self.group.size > 1:
            self._agreed_elapsed = self.p.elapsed_s
        if optimizer_state is None:
            self._start()
        self.student.train()
        self._last_checkpoint = time.monotonic()
        bar, kind = None, None
        try:
            # several processes: a launcher stops its workers with SIGTERM (torchrun on Ctrl-C): checkpoint first
            signals = (signal.SIGINT,) if self.group.size == 1 else (signal.SIGINT, signal.SIGTERM)
            with _deferred_interrupt(signals) as interrupted:
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
        current = self.p.stage_step if index == self.p.stage else 0  # steps already done in this stage (a resume)
        return tqdm(total=total, initial=done + current, desc=f"recovery: {stage.kind}", unit="step",
                    disable=not self.run_options.progress or not self.group.main, dynamic_ncols=True, leave=True)

    def _run_stage(self, index: int, stage: Stage, optimizer_state, bar, interrupted) -> None:
        if index != self.p.stage:
            self.p.stage, self.p.stage_step = index, 0
        optimizer, frozen = self.transfer.optimizer(stage.layer)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        taps = self.transfer.taps(stage.layer)
        if stage.layer is None and self.cfg.ema_decay is not None and self.ema is None:
            self.ema = [p.detach().clone() for p in self.student.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        ddp = self.group.wrap(self.student, self.projections, self.device)  # after freezing: DDP syncs what trains
        try:
            if stage.layer is None and self.p.stage_step == 0:
                self._record_evaluation()  # after the layer-wise stage
            while not stage.over(self.p.stage_step, self.elapsed) and not self.p.early_stopped:
                started = time.monotonic()
                loss = self._train_step(index, stage, optimizer, taps, ddp)
                self._after_step(stage, loss, time.monotonic() - started, bar)
                stop_after = self.run_options.stop_after_steps
                stop = interrupted() or (stop_after is not None and self.p.step >= stop_after)
                stop, due = self._agree(stop, time.monotonic() - self._last_checkpoint >=
                                        self.run_options.checkpoint_every_s)
                if stop or due:
                    self._save(optimizer)
                if stop:
                    raise KeyboardInterrupt
            self.p.flush_losses(stage.kind)
        finally:
            for tap in taps:
                tap.remove()
            for p in frozen:
                p.requires_grad_(True)

    def _after_step(self, stage: Stage, loss: float, seconds: float, bar) -> None:
        """Count the step, sample the loss curve, evaluate when due, update the progress bar."""
        p = self.p
        p.stage_step += 1
        p.step += 1
        p.log_loss(stage.kind, loss)
        p.work[stage.kind][0] += 1
        p.work[stage.kind][1] += seconds
        if stage.layer is None and (p.stage_step % self.cfg.eval_every == 0 or stage.over(p.stage_step, self.elapsed)):
            self._record_evaluation()
        bar.update(1)
        where = f"layer {stage.layer}, " if stage.layer is not None else ""
        bar.set_postfix_str(f"{where}loss {loss:.4f}{self._acc_text()}", refresh=False)

    def _acc_text(self) -> str:
        if not self.p.accuracy_curve:
            return ""
        return f", acc {self.p.accuracy_curve[-1][2]:.4f} (source {self.p.source_accuracy:.4f})"

    def _finish(self) -> dict:
        """Restore the best model, write recovery.json, print the summary line."""
        if self.best_state is not None:
            self.student.load_state_dict(self.best_state)
        elif self.ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(list(self.student.parameters()), self.ema)
        self.student.eval()
        bad = [name for name, p in self.student.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDivergedError(f"recovery produced non-finite weights ({bad[0]}{' …' if len(bad) > 1 else ''}); "
                                        "nothing was saved — lower the learning rate")
        self._agree(False, False)  # several processes: the clock of the summary
        summary = self._summary()
        if self.group.main:
            checkpoint.remove_state(self.out_dir)  # the caller saves the weights with recovery.json
        if summary.get("warning"):
            log.warning("warning: %s", summary["warning"])
        return summary

    def _summary(self) -> dict:
        p = self.p
        return {
            "metric": "accuracy" if self.eval_data is None or self.eval_data.labels is not None else "agreement",
            "source_accuracy": p.source_accuracy, "initial_accuracy": p.initial_accuracy,
            "final_accuracy": p.best_accuracy if self.cfg.keep == "best" or not p.accuracy_curve
            else p.accuracy_curve[-1][2], "best_accuracy": p.best_accuracy, "best_step": p.best_step, "steps": p.step,
            "early_stopped": p.early_stopped, "wall_s": round(self.elapsed, 2), "device": str(self.device),
            "teacher_logits_s": getattr(self, "teacher_logits_s", None),
            "stages": {kind: {"steps": p.work[kind][0], "seconds": round(p.work[kind][1], 2), "loss": curve}
                       for kind, curve in p.losses.items()},
            "accuracy_curve": p.accuracy_curve, "train_rows": len(self.train),
            "eval_rows": len(self.eval_data) if self.eval_data is not None else 0, "config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint, **({"processes": self.group.size} if self.group.size > 1 else {}),
            **({"warning": f"recovery trained only {p.step} steps: the model is barely changed from the mapping; "
                           "give more --steps (or a longer --budget)"} if p.step < FEW_STEPS else {}),
        }


# -------------------------------------------------------------------- public API
def _check_data(data: Encoded, what: str, num_labels: int) -> None:
    if data is None or len(data) == 0:
        raise DataError(f"the {what} data has no rows")
    labels = data.labels
    if what == "training" and labels is not None:  # rows added by --unlabelled carry UNLABELLED
        labels = labels[labels != UNLABELLED]
    if labels is not None and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_labels:
        raise DataError(f"the {what} data has label ids outside 0..{num_labels - 1}")


def recover(mobilebert, teacher, train_data: Encoded, config: RecoveryConfig | None = None,
            eval_data: Encoded | None = None, out_dir=None, resume: bool = False,
            head_map: list[list[int]] | None = None, run: RunOptions | None = None, logits_from=None) -> dict:
    """Train `mobilebert` (in place) against `teacher` (the source model); returns the summary.

    `train_data`/`eval_data` are tokenised with the source's tokenizer (labels optional). `out_dir`, when given, holds
    the checkpoint that `resume=True` continues from (removed when the run ends; saving the weights is the caller's
    job). `head_map[l]` lists, for each MobileBERT head of layer l, the source head it came from (only
    `attention_loss='attention_kl_mapped'` uses it). On return the model holds the best weights seen on the dev
    data (the last ones without dev data or with keep="last"). Raises TrainingDivergedError on a non-finite loss.
    """
    cfg, run = config or RecoveryConfig(), run or RunOptions()
    n_labels = mobilebert.config.num_labels
    if teacher.config.num_labels != n_labels:
        raise ShapeMismatchError(f"the source model has {teacher.config.num_labels} classes, the MobileBERT {n_labels}")
    _check_data(train_data, "training", n_labels)
    if eval_data is not None:
        _check_data(eval_data, "eval", n_labels)
    if run.stop_after_steps is not None and out_dir is None:
        raise ConfigError("stop_after_steps needs an out_dir to checkpoint into")
    if run.threads:
        torch.set_num_threads(run.threads)
    if logits_from is not None:
        model, rows = logits_from
        if len(rows) != len(train_data):
            raise DataError(f"logits_from has {len(rows)} rows, the training data {len(train_data)}: they must be the "
                            "same texts")
        if model.config.num_labels != n_labels:
            raise ShapeMismatchError(f"the logits_from model has {model.config.num_labels} classes, the MobileBERT "
                                     f"{n_labels}")
    return Recovery(mobilebert, teacher, train_data, cfg, eval_data, Path(out_dir) if out_dir else None, head_map,
                    run, logits_from).run(resume)
