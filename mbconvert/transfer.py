"""What one recovery step computes and trains: the layer-wise loss (feature map + attention transfer at one layer, both
models run only up to it) and the task loss (logit distillation against cached teacher logits).

The plumbing they need lives here too: the encoder's layer list, running only the bottom n layers, the uniform
student→teacher layer mapping when depths differ, forward hooks that keep one layer's attention inputs
(`LayerTap`), and the learned width projections used when the hidden widths differ.
`Transfer.optimizer` says which parameters a stage trains and which it freezes. mbconvert.recovery owns the loop
(plan, batches, evaluation, checkpoints) and calls `Transfer`.
"""

from __future__ import annotations

import contextlib

import torch

from . import losses, optim
from .config import RecoveryConfig
from .data import UNLABELLED, mix_tokens
from .errors import ConfigError


def layers(model) -> torch.nn.ModuleList:
    """The encoder layers of a BERT or MobileBERT classifier."""
    return model.base_model.encoder.layer


@contextlib.contextmanager
def first_layers(model, n: int):
    """Run only the bottom n encoder layers: the layer-wise stage never needs the layers above."""
    encoder = model.base_model.encoder
    full = encoder.layer
    encoder.layer = full[:n]
    try:
        yield
    finally:
        encoder.layer = full


def teacher_layer(layer: int, n_student: int, n_teacher: int) -> int:
    """Uniform layer mapping when the depths differ (identity when they match)."""
    return round((layer + 1) * n_teacher / n_student) - 1


def model_inputs(batch: dict) -> dict:
    """A batch without its labels: what the models' forward takes."""
    return {k: v for k, v in batch.items() if k != "labels"}


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


class Transfer:
    """Knowledge transfer from one teacher to one student under a config: the losses of a step, the taps they
    read, and each stage's optimiser.

    Building it checks the attention loss (and that its head map is there) and switches both models to eager
    attention when the loss reads attention probabilities. `add_projections` makes the learned width maps (random
    init: the caller seeds torch first, so that a run is reproducible).
    """

    def __init__(self, student, teacher, cfg: RecoveryConfig, head_map: list[list[int]] | None):
        self.student, self.teacher, self.cfg, self.head_map = student, teacher, cfg, head_map
        self.attention_loss = losses.attention_loss(cfg.attention_loss)
        if self.attention_loss.uses_head_map and head_map is None:
            raise ConfigError(f"attention_loss={cfg.attention_loss!r} needs the head map from conversion.json")
        if self.attention_loss.inputs == "probs":  # only eager attention materialises the probabilities
            for model in (student, teacher):
                model.set_attn_implementation("eager")
        self.n_layers = len(layers(student))
        self.projections: torch.nn.ModuleList | None = None

    def add_projections(self, device) -> torch.nn.ModuleList | None:
        """Learned student→teacher width maps for the feature-map loss, only when the widths differ."""
        s, t = self.student.config.hidden_size, self.teacher.config.hidden_size
        if s != t:
            self.projections = torch.nn.ModuleList(torch.nn.Linear(s, t, bias=False)
                                                   for _ in range(self.n_layers)).to(device)
        return self.projections

    def teacher_layer(self, layer: int) -> int:
        return teacher_layer(layer, self.n_layers, len(layers(self.teacher)))

    def optimizer(self, layer: int | None) -> tuple[torch.optim.Optimizer, list]:
        """AdamW for the stage training `layer` (None: the task stage, every parameter), and the parameters the
        caller must freeze during it and restore after (the lower layers when lower_layer_lr_scale is 0)."""
        cfg = self.cfg
        if layer is None:
            return torch.optim.AdamW(optim.param_groups(self.student.parameters(), cfg.lr, cfg.weight_decay)), []
        top = list(layers(self.student)[layer].parameters())
        if self.projections is not None:
            top += list(self.projections[layer].parameters())
        lower = list(self.student.base_model.embeddings.parameters())
        lower += [p for below in layers(self.student)[:layer] for p in below.parameters()]
        groups = optim.param_groups(top, cfg.layerwise_lr, cfg.weight_decay)
        frozen = []
        if cfg.lower_layer_lr_scale > 0:
            groups += optim.param_groups(lower, cfg.layerwise_lr * cfg.lower_layer_lr_scale, cfg.weight_decay)
        else:
            frozen = [p for p in lower if p.requires_grad]
        return torch.optim.AdamW(groups), frozen

    def taps(self, layer: int | None) -> tuple:
        """Hooks on the student's trained layer and its teacher layer, for the attention loss (none when unused);
        the caller removes them when the stage ends."""
        if layer is None or not self.cfg.attention_weight:
            return ()
        what = self.attention_loss.inputs
        return (LayerTap(layers(self.student)[layer], what),
                LayerTap(layers(self.teacher)[self.teacher_layer(layer)], what))

    def layer_loss(self, layer: int, batch: dict, taps: tuple[LayerTap, LayerTap],
                   rows: slice | None = None) -> torch.Tensor:
        """Feature-map MSE + attention transfer at one layer; both models stop at that layer. `rows` (several
        processes): only these rows of the batch, their loss weighted by their share of its real tokens (both losses
        average over real tokens), so that the processes' shares add up to the whole batch's loss."""
        share = None
        if rows is not None:
            tokens = batch["attention_mask"].sum(1)
            share = float(tokens[rows].sum()) / float(tokens.sum())  # 0 for an empty share
            batch = {k: v[_run(rows)] for k, v in batch.items()}
        inputs, mask = model_inputs(batch), batch["attention_mask"]
        with torch.no_grad(), first_layers(self.teacher, self.teacher_layer(layer) + 1):
            t_hidden = self.teacher.base_model(**inputs).last_hidden_state
        with first_layers(self.student, layer + 1):
            s_hidden = self.student.base_model(**inputs).last_hidden_state
        projection = self.projections[layer] if self.projections is not None else None
        loss = self.cfg.hidden_weight * losses.hidden_mse(s_hidden, t_hidden, mask, projection)
        if self.cfg.attention_weight:
            student_tap, teacher_tap = taps
            head_map = self.head_map[layer] if self.head_map is not None else None
            loss = loss + self.cfg.attention_weight * self.attention_loss(
                student_tap.value(), teacher_tap.value(), mask, relation_heads=self.cfg.relation_heads,
                head_map=head_map)
        return loss if share is None else loss * share

    def task_loss(self, batch: dict, targets: torch.Tensor, step: int, rows: slice | None = None) -> torch.Tensor:
        """alpha·KD + (1−alpha)·CE against `targets` (the batch rows' cached teacher logits); KD alone without
        labels. With mix_rows, some rows are token-mixed (mix_tokens, seeded by `step`) and distilled from the
        teacher's live logits, without CE. `rows` (several processes): the student runs only these rows of the
        batch, and the loss is their share of the whole batch's (optim.distillation_loss)."""
        cfg, inputs, clean = self.cfg, model_inputs(batch), None
        n_mixed = round(cfg.mix_rows * len(targets))
        if n_mixed:  # on the whole batch: every process mixes the same rows the same way
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)
            inputs, mixed = mix_tokens(inputs, n_mixed, cfg.mix_tokens, generator)
            if mixed.any():
                live_rows = mixed if rows is None else mixed & _mask(rows, len(mixed), mixed.device)
                if live_rows.any():  # the teacher labels the mixed rows this process runs
                    with torch.no_grad():
                        live = self.teacher(**{k: v[live_rows] for k, v in inputs.items()}).logits.float()
                    targets = targets.clone()
                    targets[live_rows] = live
                clean = ~mixed
        labels = batch.get("labels")
        if labels is not None and (labels == UNLABELLED).any():  # --unlabelled rows: distilled, never in the CE
            clean = (labels != UNLABELLED) if clean is None else clean & (labels != UNLABELLED)
        if rows is None:
            logits = self.student(**inputs).logits
            return optim.distillation_loss(logits, targets, labels, cfg.alpha, cfg.temperature, ce_rows=clean)
        logits = self.student(**{k: v[_run(rows)] for k, v in inputs.items()}).logits
        loss = optim.distillation_loss(logits, targets, labels, cfg.alpha, cfg.temperature, ce_rows=clean,
                                       rows=_run(rows))
        return loss if rows.stop > rows.start else loss * 0


def _run(rows: slice) -> slice:
    """The rows a process runs: its share, or the batch's first row (weighted 0) when its share is empty, since DDP
    needs every process in every step."""
    return rows if rows.stop > rows.start else slice(0, 1)


def _mask(rows: slice, n: int, device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[rows] = True
    return mask
