"""FP16-safe NoNorm: per-channel rescaling of a NoNorm MobileBERT that keeps its function and bounds its activations.

NoNorm(x) = x·w + b is elementwise and ReLU is positively homogeneous (relu(x/s) = relu(x)/s for s > 0), so every
activation stream of transformers' MobileBertForSequenceClassification (use_bottleneck, key_query_shared_bottleneck,
no bottleneck attention, what mbconvert writes) can be divided per channel by positive scales D, y' = y / D, with
the modules that write and read it compensating exactly:

- a Linear writing the stream: rows and bias / D_out; a Linear reading it: columns · D_in
  (embedding_transformation reads the trigram concatenation: its columns take the word scale three times);
- an Embedding writing it: columns / D_out;
- a NoNorm reading stream `in` and writing stream `out`: w' = w · D_in / D_out, b' = b / D_out;
- a residual sum `dense(z) + r` before a NoNorm: the sum, the dense output and r are one stream (one D).

The streams (groups) of layer l, reading the residual stream h_l: h_l itself, which is also the output bottleneck's
pre-norm sum W_up u + b + h_l (so NoNorm_out: w·D_l/D_{l+1}, b/D_{l+1}; the embedding NoNorm: w·D_sum/D_0,
b/D_0; the pooler's dense, or the classifier without one, reads h_L); the inputs of the bottleneck NoNorms; the
attention residual a (bottleneck.input's NoNorm output = attention.output's pre-norm sum); the shared q/k
bottleneck output s; the values v, which the context softmax(qkᵀ)·v inherits channel by channel; every FFN's
stream (its input = its pre-norm sum) and its ReLU intermediate; the output NoNorm's output u. Queries and keys
take reciprocal scales (q/D, k·D: qkᵀ unchanged). Before the layers: the word embeddings and the embedding sum.

Scales are powers of two, so in FP32 every product is the same number (the logits change only where a value
underflows), and they are chosen from per-channel peaks |activation| over the real tokens of `data` (the stream's
tensors, pre-norm sums and NoNorm products x·w included): a channel within the target 65504 / margin, whose writers'
parameters are within it too, keeps scale 1 (nothing is scaled up, a model already in range is left byte for byte).
Any other channel is divided by at least the smallest power of two that brings both under the target, and further
towards the balance √(peak / |reader weight|) (its readers' weights grow by the same factor: stopping at the target
leaves them up to peak / target times smaller, towards FP16's subnormals), but never below a peak of 1 nor past
readers' weights of the target.

What no such rescaling can bound, and is reported instead: the attention scores q·kᵀ/√d (a function of the
model's input, invariant under the q/k rescale), the pooler's pre-tanh activations (tanh is not homogeneous), the
logits (the model's output), and q/k channels whose product alone exceeds target².
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from .data import Encoded
from .errors import ConfigError
from .numerics import FP16_MAX, activation_peaks, headroom

log = logging.getLogger("mbconvert")
Members = dict[str, list[tuple[str, str]]]  # group → [(module path, "in" | "out" | "product")]


def _plan(model) -> tuple[Members, dict[str, tuple[str | None, str | None]], dict[str, str]]:
    """The model's streams: their member tensors, each module's (input stream, output stream), each stream's kind
    ("free", "query", "key" or "fixed": not homogeneous). Streams are named hidden.l (the residual stream into layer
    l), layer.l.ffn.j (FFN j's input and pre-norm sum; the last j is the layer's own intermediate/output),
    layer.l.ffn.j.relu, layer.l.{bottleneck.input, bottleneck.shared} (pre-NoNorm), layer.l.{attention.sum, shared,
    query, key, value, output}, embeddings.{word, sum}."""
    members: Members = {}
    roles: dict[str, tuple[str | None, str | None]] = {}
    kinds: dict[str, str] = {}

    def add(group, module, what):
        members.setdefault(group, []).append((module, what))

    def linear(module, src, dst):
        roles[module] = (src, dst)
        if dst is not None:
            add(dst, module, "out")

    def norm(module, src, dst):
        roles[module] = (src, dst)
        add(src, module, "in")
        add(dst, module, "out")
        add(dst, module, "product")

    names = {m: n for n, m in model.named_modules()}
    base = model.base_model
    b, e = names[base] + ".", names[base.embeddings] + "."
    transformed = base.embeddings.trigram_input or model.config.embedding_size != model.config.hidden_size
    word = "embeddings.word" if transformed else "embeddings.sum"
    roles[e + "word_embeddings"] = (None, word)
    add(word, e + "word_embeddings", "out")
    if word != "embeddings.sum":
        linear(e + "embedding_transformation", word, "embeddings.sum")
    for table in ("position_embeddings", "token_type_embeddings"):
        roles[e + table] = (None, "embeddings.sum")
        add("embeddings.sum", e + table, "out")
    norm(e + "LayerNorm", "embeddings.sum", "hidden.0")
    for i, layer in enumerate(base.encoder.layer):
        p, g, h = f"{b}encoder.layer.{i}.", f"layer.{i}.", f"hidden.{i}"
        linear(p + "bottleneck.input.dense", h, g + "bottleneck.input")
        norm(p + "bottleneck.input.LayerNorm", g + "bottleneck.input", g + "attention.sum")
        linear(p + "bottleneck.attention.dense", h, g + "bottleneck.shared")
        norm(p + "bottleneck.attention.LayerNorm", g + "bottleneck.shared", g + "shared")
        linear(p + "attention.self.query", g + "shared", g + "query")
        linear(p + "attention.self.key", g + "shared", g + "key")
        kinds[g + "query"], kinds[g + "key"] = "query", "key"
        linear(p + "attention.self.value", h, g + "value")
        add(g + "value", p + "attention.output.dense", "in")  # the context: softmax(qkᵀ)·v, per channel
        linear(p + "attention.output.dense", g + "value", g + "attention.sum")
        ffns = [f"ffn.{j}." for j in range(len(getattr(layer, "ffn", None) or []))] + [""]
        for j, f in enumerate(ffns):
            stream, relu = g + f"ffn.{j}", g + f"ffn.{j}.relu"
            norm(p + (f"{ffns[j - 1]}output.LayerNorm" if j else "attention.output.LayerNorm"),
                 g + (f"ffn.{j - 1}" if j else "attention.sum"), stream)
            linear(p + f + "intermediate.dense", stream, relu)
            linear(p + f + "output.dense", relu, stream)
            act = (layer.ffn[j] if f else layer).intermediate.intermediate_act_fn
            kinds[relu] = "free" if isinstance(act, nn.ReLU) else "fixed"
        norm(p + "output.LayerNorm", g + f"ffn.{len(ffns) - 1}", g + "output")
        linear(p + "output.bottleneck.dense", g + "output", h)
        norm(p + "output.bottleneck.LayerNorm", h, f"hidden.{i + 1}")
    last = f"hidden.{len(base.encoder.layer)}"
    if getattr(base.pooler, "do_activate", False):
        linear(names[base.pooler.dense], last, None)
    else:
        linear(names[model.classifier], last, None)
    return members, roles, {g: kinds.get(g, "free") for g in members}


def _channel_peak(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max |t| per channel (last dim) over real token positions; (1, seq, C) tables (position ids) over positions
    real in any row; (rows, C) tensors over rows."""
    t = t.detach().float().abs()
    if t.dim() == 3:
        m = mask if t.shape[0] == mask.shape[0] else mask.any(0, keepdim=True)
        t = t.masked_fill(~m[:, : t.shape[1], None], 0)
    return t.reshape(-1, t.shape[-1]).amax(0).cpu()


@torch.no_grad()
def _measure(model, data: Encoded, members: Members, batch_size: int = 16) -> tuple[dict, list[float], torch.Tensor]:
    """Per-channel peaks of every member tensor, each layer's peak |attention score| (q·kᵀ·scaling over real
    query and key positions) and the FP32 logits, in one eval pass."""
    wanted: dict[str, set[str]] = {}
    for tensors in members.values():
        for module, what in tensors:
            wanted.setdefault(module, set()).add(what)
    peaks: dict[tuple[str, str], torch.Tensor] = {}
    state: dict = {}

    def keep(key, value):
        peaks[key] = value if key not in peaks else torch.maximum(peaks[key], value)

    def hook(name, whats):
        def record(module, inp, out):
            tensors = {"in": inp[0], "out": out}
            if "product" in whats:
                tensors["product"] = inp[0] * module.weight
            for what in whats:
                keep((name, what), _channel_peak(tensors[what], state["mask"]))
        return record

    def qk(name):
        def record(module, inp, out):
            state[name] = out
        return record

    scores: list[float] = []

    def score(i, attention):
        def record(module, inp, out):
            q, k = (state[f"{i}.{n}"].unflatten(-1, (-1, attention.attention_head_size)).transpose(1, 2)
                    for n in ("q", "k"))
            s = (q @ k.transpose(-1, -2)).abs() * attention.scaling
            m = state["mask"]
            s = s.masked_fill(~(m[:, None, :, None] & m[:, None, None, :]), 0)
            scores[i] = max(scores[i], float(s.max()))
        return record

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook(name, whats)) for name, whats in sorted(wanted.items())]
    for i, layer in enumerate(model.base_model.encoder.layer):
        scores.append(0.0)
        attention = layer.attention.self
        handles += [attention.query.register_forward_hook(qk(f"{i}.q")),
                    attention.key.register_forward_hook(qk(f"{i}.k")),
                    attention.register_forward_hook(score(i, attention))]
    device, training, logits = next(model.parameters()).device, model.training, []
    try:
        model.eval()
        for start in range(0, len(data), batch_size):
            feeds = {k: getattr(data, k)[start:start + batch_size].to(device)
                     for k in ("input_ids", "attention_mask", "token_type_ids")}
            state["mask"] = feeds["attention_mask"].bool()
            logits.append(model(**feeds).logits.float().cpu())
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return peaks, scores, torch.cat(logits)


def _pow2_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ≥ x where x > 1; 1 elsewhere."""
    return torch.where(x > 1, torch.exp2(torch.ceil(torch.log2(x.clamp_min(1)))), torch.ones_like(x))


def _tile(d: torch.Tensor, width: int) -> torch.Tensor:
    return d.repeat(width // len(d))  # embedding_transformation reads the word stream three times (trigram)


def _weight_need(module: nn.Module, d_in: torch.Tensor | None) -> torch.Tensor:
    """Per output channel, the largest |parameter| the module would hold after absorbing `d_in` (its rows not yet
    divided): a stream's divisor must also bring the weights and biases of its writer within the target."""
    w = module.weight.detach().double().abs()
    if isinstance(module, nn.Embedding):
        return w.amax(0)
    if isinstance(module, nn.Linear):
        need = (w * (_tile(d_in, w.shape[1])[None, :] if d_in is not None else 1)).amax(1)
    else:  # NoNorm
        need = w * (d_in if d_in is not None else 1)
    return need if module.bias is None else torch.maximum(need, module.bias.detach().double().abs())


def _reader_weight(module: nn.Module, width: int) -> torch.Tensor:
    """Per channel of the stream a module reads, its largest |weight| on that channel."""
    w = module.weight.detach().double().abs()
    return w.amax(0).reshape(-1, width).amax(0) if isinstance(module, nn.Linear) else w


def _scales(model, members: Members, roles: dict, kinds: dict[str, str], peaks: dict, target: float,
            rounds: int = 32) -> dict[str, torch.Tensor]:
    """Each stream's per-channel divisor D (powers of two): 1 where the stream's peak and its writers' parameters
    (after absorbing their input's scales) are within the target. Elsewhere at least the smallest power of two that
    brings them there, and further, up to the balance of the stream and its readers' weights (√(peak / |w|):
    readers' weights grow by D, so stopping at the target could push them towards FP16's subnormals), but never
    below a peak of 1 nor past readers' weights of the target. Queries and keys reciprocal, within the target both
    where possible (else balanced). Weights tie streams in cycles (a layer's output bottleneck writes the residual
    its own bottlenecks read), so the divisors are raised until they no longer change."""
    modules = dict(model.named_modules())
    peak = {g: torch.stack([peaks[m] for m in tensors]).amax(0).double() for g, tensors in members.items()}
    need_peak = {g: p / target for g, p in peak.items()}
    writers: dict[str, list] = {}
    read = {g: torch.zeros_like(p) for g, p in peak.items()}
    for name, (src, dst) in roles.items():
        if dst is not None:
            writers.setdefault(dst, []).append((modules[name], src))
        if src is not None:
            read[src] = torch.maximum(read[src], _reader_weight(modules[name], len(read[src])))
    read = {g: r.clamp_min(1e-30) for g, r in read.items()}
    balance = {g: torch.exp2(torch.floor(torch.log2(torch.minimum((p / read[g]).sqrt(), torch.minimum(
        p.clamp_min(1), target / read[g]))))) for g, p in peak.items()}
    scales = {g: torch.ones_like(n) for g, n in need_peak.items()}
    for _ in range(rounds):
        need = {}
        for g, n in need_peak.items():
            for module, src in writers.get(g, []):
                n = torch.maximum(n, _weight_need(module, scales[src] if src else None) / target)
            need[g] = n
        new = {}
        for g, kind in kinds.items():
            if kind == "free":
                new[g] = torch.where(need[g] > 1, _pow2_at_least(need[g]).maximum(balance[g]), 1.0)
            elif kind == "query":  # q / D, k · D: D ≥ need_q and 1 / D ≥ need_k where possible, else balanced
                key = g.removesuffix("query") + "key"
                nq, nk = need[g].clamp_min(1e-30), need[key].clamp_min(1e-30)
                lo, hi = torch.exp2(torch.ceil(torch.log2(nq))), torch.exp2(torch.floor(-torch.log2(nk)))
                balanced = torch.exp2(torch.round(0.5 * torch.log2(nq / nk)))
                new[g] = torch.where(lo <= hi, lo.clamp_min(1).minimum(hi), balanced)
                new[key] = 1 / new[g]
            elif kind == "fixed":
                new[g] = torch.ones_like(need[g])
        if all(torch.equal(new[g], scales[g]) for g in scales):
            break
        scales = new
    return {g: s.float() for g, s in scales.items()}


@torch.no_grad()
def _apply(model, roles: dict, scales: dict[str, torch.Tensor]) -> None:
    """Divide every stream by its scales: writers' rows (or NoNorm outputs) / D_out, readers' columns · D_in."""
    modules = dict(model.named_modules())
    for name, (src, dst) in roles.items():
        module = modules[name]
        d_in = scales[src] if src is not None else None
        d_out = scales[dst] if dst is not None else None
        if (d_in is None or bool((d_in == 1).all())) and (d_out is None or bool((d_out == 1).all())):
            continue
        w = module.weight
        one = torch.ones(w.shape[-1])
        d_in = one if d_in is None else _tile(d_in, w.shape[-1])
        d_out = torch.ones(w.shape[0] if isinstance(module, nn.Linear) else w.shape[-1]) if d_out is None else d_out
        d_in, d_out = d_in.to(w), d_out.to(w)
        if isinstance(module, nn.Embedding):
            w.div_(d_out)
        elif isinstance(module, nn.Linear):
            w.mul_(d_in[None, :]).div_(d_out[:, None])
            if module.bias is not None:
                module.bias.div_(d_out)
        else:  # NoNorm
            w.mul_(d_in).div_(d_out)
            module.bias.div_(d_out)


def _fp16(model, data: Encoded, reference: torch.Tensor, batch_size: int = 16) -> dict:
    """model.half() on `data`: are the logits finite, and how often is their argmax the FP32 one?"""
    half = copy.deepcopy(model).half().eval()
    device = next(half.parameters()).device
    with torch.no_grad():
        logits = torch.cat([half(**{k: getattr(data, k)[s:s + batch_size].to(device)
                                    for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.float().cpu()
                            for s in range(0, len(data), batch_size)])
    return {"finite": bool(torch.isfinite(logits).all()),
            "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())}


def _summary(before: dict, after: dict) -> dict:
    def pair(a, b):
        return {"peak_before": a["peak"], "fp16_headroom_before": headroom(a["peak"]), "module_before": a["module"],
                "peak_after": b["peak"], "fp16_headroom_after": headroom(b["peak"]), "module_after": b["module"]}

    return {**pair(before, after), "embeddings": pair(before["embeddings"], after["embeddings"]),
            "layers": [{"layer": a["layer"], **pair(a, b)} for a, b in zip(before["layers"], after["layers"])],
            "head": pair(before["head"], after["head"])}


def unsupported(model, layer_norm: str = "LayerNorm bounds its own outputs, nothing to do") -> str | None:
    """Why `make_fp16_safe` cannot rescale `model` (None: it can); mbconvert.folding's per-stream rescaling asks the
    same, with its own word for a LayerNorm model (`layer_norm`)."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "MobileBertForSequenceClassification":
        return f"{type(model).__name__} is not a MobileBertForSequenceClassification"
    if config.normalization_type != "no_norm":
        return f"normalization_type {config.normalization_type}: {layer_norm}"
    if not config.use_bottleneck or config.use_bottleneck_attention or not config.key_query_shared_bottleneck:
        return ("only use_bottleneck=True, key_query_shared_bottleneck=True, use_bottleneck_attention=False "
                "(mbconvert's MobileBERT) is supported")
    return None


def make_fp16_safe(model, data: Encoded, margin: float = 16.0, activations: dict | None = None) -> dict:
    """Rescale a NoNorm MobileBertForSequenceClassification in place so that every activation the rescaling can
    reach peaks at most 65504 / margin on `data`, with the same function (module docstring). Deterministic.
    `activations`: activation_peaks(model, data), if already measured. Returns the report: per-layer peak and FP16
    headroom before/after, the streams rescaled, what could not be bounded and why, the FP32 logits' change
    (max |Δ| and max |Δ| / max |logit|), and model.half()'s finiteness and argmax agreement with FP32 before/after."""
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 1):
        raise ConfigError(f"the FP16 margin must be a finite number ≥ 1, not {margin!r}")
    target = FP16_MAX / margin
    reason = unsupported(model)
    if reason is not None:
        log.info("fp16-safe: nothing done: %s", reason)
        return {"rescaled": False, "reason": reason, "margin": margin, "target": target}
    if len(data) == 0:
        raise ConfigError("choosing FP16 scales needs at least one text")
    members, roles, kinds = _plan(model)
    before = activations or activation_peaks(model, data)
    peaks, scores, logits = _measure(model, data, members)
    scales = _scales(model, members, roles, kinds, peaks, target)
    changed = {g: s for g, s in scales.items() if bool((s != 1).any())}
    report = {"rescaled": bool(changed), "reason": None, "margin": margin, "target": target, "rows": len(data),
              "streams": [{"stream": g, "channels": len(s), "rescaled": int((s != 1).sum()),
                           "max_divisor": float(s.max()), "min_divisor": float(s.min())} for g, s in changed.items()]}
    fp16_before, weight_before = _fp16(model, data, logits), _max_weight(model)
    if changed:
        _apply(model, roles, scales)
        after = activation_peaks(model, data)
        peaks_after, scores_after, logits_after = _measure(model, data, members)
        fp16_after = _fp16(model, data, logits)
    else:
        after, peaks_after, scores_after, logits_after, fp16_after = before, peaks, scores, logits, fp16_before
    change = float((logits_after - logits).abs().max()) if len(logits) else 0.0
    scale = float(logits.abs().max()) if len(logits) else 0.0
    report["logits"] = {"max_abs_change": change, "max_relative_change": change / scale if scale > 0 else change}
    report.update(_summary(before, after))
    report["fp16"] = {"before": fp16_before, "after": fp16_after}
    report["not_rescalable"] = _not_rescalable(members, kinds, peaks_after, scores, scores_after, before, after,
                                               target)
    weight = _max_weight(model)
    if weight[0] > FP16_MAX:
        report["not_rescalable"].append({"what": weight[1], "peak_before": weight_before[0], "peak_after": weight[0],
                                         "within_target": False, "reason": "a parameter beyond FP16's range "
                                                                           "(peak_before: before the rescale)"})
    report["unbounded"] = [entry["what"] for entry in report["not_rescalable"] if not entry["within_target"]]
    log.info("fp16-safe: %d streams rescaled; peak |activation| %.3g → %.3g (FP16 headroom %.3g → %.3g); "
             "FP32 logits change %.2g relative; unbounded: %s", len(changed), before["peak"], after["peak"],
             headroom(before["peak"]) or math.inf, headroom(after["peak"]) or math.inf,
             report["logits"]["max_relative_change"], ", ".join(report["unbounded"]) or "none")
    return report


def _max_weight(model) -> tuple[float, str]:
    return max((float(p.detach().abs().max()), n) for n, p in model.named_parameters())


def _not_rescalable(members, kinds, peaks_after, scores, scores_after, before, after, target) -> list[dict]:
    """What the rescaling cannot move, measured after it: attention scores, the pooler's pre-tanh activations,
    the logits, non-ReLU intermediates, q/k channels still over the target."""
    out = []

    def entry(what, peak_before, peak_after, reason):
        out.append({"what": what, "peak_before": peak_before, "peak_after": peak_after,
                    "within_target": peak_after <= target, "reason": reason})

    for i, (a, b) in enumerate(zip(scores, scores_after)):
        entry(f"layer.{i}.attention.scores", a, b, "q·kᵀ/√d is what softmax reads: any rescale that keeps the "
                                                     "function keeps it")
    head_before, head_after = before["head"]["modules"], after["head"]["modules"]
    for name in sorted(head_after):
        if name.endswith("pooler.dense"):
            entry(name, head_before[name], head_after[name], "feeds tanh, which is not positively homogeneous")
        elif name.endswith("classifier"):
            entry(name, head_before[name], head_after[name], "the logits: the model's output")
    for g, kind in kinds.items():
        peak = float(torch.stack([peaks_after[m] for m in members[g]]).max())
        if kind == "fixed":
            entry(g, peak, peak, "the FFN activation is not ReLU: not positively homogeneous")
        elif kind in ("query", "key") and peak > target:
            entry(g, peak, peak, "queries and keys take reciprocal scales: their product per channel exceeds "
                                 "target²")
    return out
