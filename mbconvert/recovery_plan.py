"""The plan of a recovery run and its position in it: how steps (or seconds) are split between the layer-wise
stages and the task stage (`Stage`, `plan_stages`), and everything a checkpoint must hold to resume (`Progress`).

mbconvert.recovery runs the plan; this module holds no tensors and does no training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import RecoveryConfig
from .errors import ConfigError

LOSS_SAMPLE_EVERY = 10  # steps averaged into one point of the loss curves in recovery.json


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

    def fraction_done(self, stage_step: int, elapsed_s: float) -> float:
        """How far the stage is (0..1), by steps or, under a time budget, by seconds: drives the LR schedule."""
        if self.steps is not None:
            return stage_step / self.steps
        return (elapsed_s - self.start_s) / max(1e-9, self.deadline_s - self.start_s)

    def over(self, stage_step: int, elapsed_s: float) -> bool:
        if self.steps is not None:
            return stage_step >= self.steps
        return elapsed_s >= self.deadline_s


def plan_stages(cfg: RecoveryConfig, n_layers: int, n_rows: int) -> list[Stage]:
    """Split steps (or seconds) between the layers and the task stage by `layerwise_share`."""
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


@dataclass
class Progress:
    """Everything about a run's position and history; saved in checkpoints as primitives."""

    stage: int = 0
    stage_step: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    source_accuracy: float | None = None
    initial_accuracy: float | None = None
    best_accuracy: float | None = None
    best_step: int | None = None
    early_stopped: bool = False
    losses: dict = field(default_factory=lambda: {"layer-wise": [], "task": []})  # kind → [[step, loss]]
    work: dict = field(default_factory=lambda: {"layer-wise": [0, 0.0], "task": [0, 0.0]})  # kind → [steps, s]
    accuracy_curve: list = field(default_factory=list)  # [[step, seconds, accuracy]]
    loss_window: list = field(default_factory=list)

    def log_loss(self, kind: str, loss: float) -> None:
        """Add a step's loss; every LOSS_SAMPLE_EVERY steps their mean becomes one point of the loss curve."""
        self.loss_window.append(loss)
        if len(self.loss_window) == LOSS_SAMPLE_EVERY:
            self.flush_losses(kind)

    def flush_losses(self, kind: str) -> None:
        """The mean of the losses not yet on the curve becomes a point (at a stage's end)."""
        if self.loss_window:
            self.losses[kind].append([self.step, sum(self.loss_window) / len(self.loss_window)])
            self.loss_window = []
