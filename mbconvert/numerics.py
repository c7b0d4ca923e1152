"""Activation ranges for on-device numerics: the peak |activation| of every module of a BERT/MobileBERT classifier
over real (unpadded) token positions, grouped by encoder layer, and the FP16 headroom (65504 / peak).

MobileBERT's NoNorm is an unbounded affine map, so its activations can grow far past FP16's range even when the
FP32 model is fine; this measures how far, and where, before anyone exports with FP16 compute.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .data import Encoded
from .errors import ConfigError

log = logging.getLogger("mbconvert")
FP16_MAX = 65504.0
_SKIP = (nn.Dropout, nn.ModuleList)  # dropout repeats its input in eval; a ModuleList is never called


def _tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors a module returned (itself, or the tensors of a returned tuple)."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _peak(t: torch.Tensor, mask: torch.Tensor) -> float | None:
    """max |t| over real positions: (batch, seq, features) outputs are masked; (batch, features) ones (pooler,
    classifier) are per row; anything else (attention probabilities) is not an activation that FP16 stores."""
    batch, seq = mask.shape
    if t.dim() == 3 and t.shape[:2] == (batch, seq):
        return float(t.detach().abs().float().masked_fill(~mask[:, :, None], 0).max())
    if t.dim() == 2 and t.shape[0] == batch:
        return float(t.detach().abs().float().max())
    return None


def _groups(model: nn.Module) -> dict[str, int]:
    """Module path → encoder layer index."""
    layers = model.base_model.encoder.layer
    prefix = next(name for name, m in model.named_modules() if m is layers) + "."
    index = {}
    for i, layer in enumerate(layers):
        for sub, _ in layer.named_modules():
            index[prefix + f"{i}" + (f".{sub}" if sub else "")] = i
    return index


@torch.no_grad()
def _module_peaks(model: nn.Module, data: Encoded, batch_size: int) -> dict[str, float]:
    """Module path → peak |output| over the real positions of every row of `data`, one pass in eval mode."""
    peaks: dict[str, float] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, _inp, out):
            for t in _tensors(out):
                p = _peak(t, current["mask"])
                if p is not None:
                    peaks[name] = max(peaks.get(name, 0.0), p)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if name and not isinstance(m, _SKIP)]
    device = next(model.parameters()).device
    training = model.training
    try:
        model.eval()
        for batch in data.batches(batch_size, order=data.length_order()):
            feeds = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")}
            current["mask"] = feeds["attention_mask"].bool()
            model(**feeds)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return peaks


def _top(peaks: dict[str, float]) -> dict:
    """The peak and its module; of modules that tie (a container returns its last submodule's output), the
    innermost one, which computes it."""
    module = max(peaks, key=lambda name: (peaks[name], name.count("."))) if peaks else None
    return {"peak": peaks[module] if module else 0.0, "module": module}


def headroom(peak: float) -> float | None:
    """65504 / peak: how many times larger activations could grow before FP16 overflows (None for an all-zero
    model: nothing to overflow)."""
    return FP16_MAX / peak if peak > 0 else None


def activation_peaks(model: nn.Module, data: Encoded, batch_size: int = 64, max_rows: int | None = None) -> dict:
    """Per encoder layer, the peak |output| of each of its modules (attention, the NoNorm/LayerNorm outputs, every
    stacked FFN's intermediate before and after ReLU, the layer output ...) over real token positions (padding is
    masked out), named by module path; the embeddings and the head likewise; the overall peak, where it is, and
    `fp16_headroom` = 65504 / peak (< 1: FP16 overflows). `max_rows`: only the first rows of `data`."""
    base_model = getattr(model, "base_model", None)
    if not hasattr(base_model, "embeddings") or not hasattr(getattr(base_model, "encoder", None), "layer"):
        raise ConfigError(f"cannot measure activations of {type(model).__name__}: expected a BERT/MobileBERT model")
    if max_rows is not None and len(data) > max_rows:
        data = Encoded(data.input_ids[:max_rows], data.attention_mask[:max_rows], data.token_type_ids[:max_rows],
                       None)
    peaks = _module_peaks(model, data, batch_size)
    index = _groups(model)
    base = next(name for name, m in model.named_modules() if m is model.base_model.embeddings)
    layers: list[dict[str, float]] = [{} for _ in model.base_model.encoder.layer]
    embeddings, head = {}, {}
    for name, value in peaks.items():
        if name in index:
            layers[index[name]][name] = value
        elif name == base or name.startswith(base + "."):
            embeddings[name] = value
        else:  # pooler, classifier (the encoder and base model return ModelOutputs, which are not recorded)
            head[name] = value
    overall = _top(peaks)
    log.info("peak |activation| %.3g in %s on %d texts: FP16 headroom %.3g", overall["peak"], overall["module"],
             len(data), headroom(overall["peak"]) or float("inf"))
    return {"rows": len(data), "peak": overall["peak"], "module": overall["module"],
            "fp16_headroom": headroom(overall["peak"]), "fp16_max": FP16_MAX,
            "embeddings": {**_top(embeddings), "modules": embeddings},
            "layers": [{"layer": i, **_top(m), "fp16_headroom": headroom(_top(m)["peak"]),
                        "modules": m} for i, m in enumerate(layers)],
            "head": {**_top(head), "modules": head}}
