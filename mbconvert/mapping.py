"""Stage 2 — map: the MobileBERTAdapter turns a BERT classifier into a MobileBertForSequenceClassification.

The two blocks differ in shape, so weights cannot be copied; each piece is derived and, given
calibration text, fitted to the source's own activations (least squares on real tokens):

  BERT layer (width H)                         MobileBERT layer (inter-block H, intra-block b)
  x ─ attention(8 heads of 64) ─ LN ─┐         x ─ bottleneck ─ attention(4 heads of b/4) ─ NoNorm ─┐
                 FFN(GELU, 2048) ─ LN ─ out                N × FFN(ReLU, 4b) in width b ─ NoNorm ─ up-proj(+x) ─ NoNorm ─ out

- Intra-block stream: the b-dim stream carries z = Q(s − μ), the coordinates of BERT's post-attention
  state s in its b principal directions Q (PCA of s; the FFN input weights' right singular vectors
  without data).
- Embeddings: truncated SVD of the word table (E ≈ U·S·Vᵀ): word_embeddings = (U·S)[:, :e], the
  centre block of embedding_transformation = V[:, :e] (the trigram neighbours' blocks are zero).
- Attention: heads ranked by Taylor importance (|∂loss/∂head gate| on calibration text; weight norms
  without data); the kept heads' query·key bilinear forms are projected into the shared q/k bottleneck
  (the subspace that best preserves them under the input's second moment) and truncated by SVD to the
  target head size; each head's value·output product is truncated the same way into the stream.
- FFN: neurons ranked by Taylor importance and split into the N stacked FFNs with balanced importance;
  GELU→ReLU by a per-neuron fit relu(a·p + c) ≈ gelu(p) on the neuron's own pre-activations.
- LayerNorm→NoNorm: every norm's per-feature scale/shift is fitted by least squares to what the source
  computes at that point (linearised LayerNorm, γ/σ̄ and β, without data).
- With data, every projection is then refitted by ridge least squares on the MobileBERT's own inputs
  (layer by layer, so errors of earlier layers are corrected, not compounded).

One layer is mapped by mbconvert.layer_mapping.LayerMapper; its docstring labels this diagram with the
symbols the code uses.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BertForSequenceClassification, MobileBertConfig, MobileBertForSequenceClassification

from . import linalg
from .canonical import is_factorised
from .config import ConvertConfig
from .data import Encoded
from .errors import ConfigError
from .family_mapping import factorised_embedding, first_token_states, fit_head, needs_head_fit
from .layer_mapping import LayerActivations, LayerMapper
from .linalg import F64
from .load import SourceModel

log = logging.getLogger("mbconvert")


class MobileBERTAdapter:
    """Maps a BERT-family classifier (canonical BertForSequenceClassification) into MobileBERT."""

    def __init__(self, config: ConvertConfig | None = None, progress: bool = True):
        self.config = config or ConvertConfig()
        self.progress = progress  # a bar over the layers (36–78 s on the benchmark students)

    # ---------------------------------------------------------------- target shape
    def embedding_size(self, src) -> int:
        """The factorised embedding width: the config's, else a factorised source's own (ELECTRA, ALBERT), else
        MobileBERT's 128 (at most the source's hidden size and vocabulary: a pruned vocabulary can be smaller)."""
        own = getattr(src, "embedding_size", None)
        return self.config.embedding_size or min(own or 128, src.hidden_size, src.vocab_size)

    def target_config(self, src) -> MobileBertConfig:
        c, H = self.config, src.hidden_size
        if not 0 < c.bottleneck < H:
            raise ConfigError(f"bottleneck {c.bottleneck} must be smaller than the source's hidden size {H}")
        if c.ffn < 1:
            raise ConfigError("--ffn must be at least 1")
        e = self.embedding_size(src)
        if not 0 < e <= min(H, src.vocab_size):
            raise ConfigError(f"embedding size {e} must be in 1..{min(H, src.vocab_size)}")
        heads = c.heads_out or default_heads(c.bottleneck, src.num_attention_heads)
        if heads > src.num_attention_heads:
            raise ConfigError(f"--heads-out {heads} exceeds the source's {src.num_attention_heads} heads")
        if c.bottleneck % heads:
            raise ConfigError(f"bottleneck {c.bottleneck} is not divisible by {heads} heads")
        if c.norm not in ("no_norm", "layer_norm") or c.act not in ("relu", "gelu"):
            raise ConfigError("norm must be no_norm|layer_norm and act relu|gelu")
        cfg = MobileBertConfig(
            vocab_size=src.vocab_size, hidden_size=H, num_hidden_layers=src.num_hidden_layers,
            num_attention_heads=heads, intermediate_size=c.intermediate_size or 4 * c.bottleneck,
            hidden_act=c.act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.1,
            max_position_embeddings=src.max_position_embeddings, type_vocab_size=src.type_vocab_size,
            layer_norm_eps=src.layer_norm_eps, pad_token_id=src.pad_token_id, embedding_size=e,
            trigram_input=True, use_bottleneck=True, intra_bottleneck_size=c.bottleneck,
            use_bottleneck_attention=False, key_query_shared_bottleneck=True, num_feedforward_networks=c.ffn,
            normalization_type=c.norm, classifier_activation=True, num_labels=src.num_labels,
            id2label=dict(src.id2label), label2id=dict(src.label2id),
        )
        cfg._attn_implementation = "eager"
        return cfg

    # ---------------------------------------------------------------- the mapping
    def convert(self, source: SourceModel | BertForSequenceClassification, calib: Encoded | None = None
                ) -> tuple[MobileBertForSequenceClassification, dict]:
        """Return (MobileBERT, report). `calib`: tokenised calibration texts (labels optional).

        Runs on one thread: multi-threaded BLAS may change its reduction order with the machine's load,
        which flips last bits; one thread makes the output bytes a function of the inputs and seed."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return self._convert(source, calib)
        finally:
            torch.set_num_threads(threads)

    def _convert(self, source, calib):
        teacher = source.model if isinstance(source, SourceModel) else source
        teacher.eval()
        mc = self.target_config(teacher.config)
        torch.manual_seed(self.config.seed)
        mobile = MobileBertForSequenceClassification(mc).eval()
        mobile.config._attn_implementation = "eager"
        acts = TeacherActivations(teacher, calib) if calib is not None else None
        heads_imp, neurons_imp = (taylor_importance(teacher, calib) if calib is not None
                                  else weight_importance(teacher))
        report = {"target": {k: getattr(mc, k) for k in DERIVED_FIELDS},
                  "calibration": {"texts": len(calib), "tokens": acts.tokens} if acts else "none (weights only)"}
        report["embeddings"] = self._map_embeddings(teacher, mobile, acts)
        x_mobile = embeddings_output(mobile, calib) if acts else None
        report["layers"] = []
        for i in tqdm(range(mc.num_hidden_layers), desc="mapping layers", unit="layer", leave=False,
                      disable=not self.progress):
            step = LayerMapper(self.config, teacher.bert.encoder.layer[i], mobile.mobilebert.encoder.layer[i], mc,
                               heads_imp[i], neurons_imp[i])
            layer_report, x_mobile = step.run(acts.layer(i) if acts else None, x_mobile)
            report["layers"].append(layer_report)
        if needs_head_fit(teacher):  # DistilBERT's ReLU head, ELECTRA's GELU head → MobileBERT's tanh pooler
            ids, types, mask = embedding_tokens(teacher, acts, self.config.seed)
            first = acts.hidden[-1][:, 0] if acts else first_token_states(teacher, ids, mask, types)
            report["head"] = fit_head(teacher, mobile, first)
        else:
            copy_(mobile.mobilebert.pooler.dense, teacher.bert.pooler.dense)
            copy_(mobile.classifier, teacher.classifier)
        return mobile, report

    def _map_embeddings(self, teacher, mobile, acts) -> dict:
        if is_factorised(teacher.config):  # ELECTRA, ALBERT: their own E-wide tables (mbconvert.family_mapping)
            report = factorised_embedding(teacher, mobile, *embedding_tokens(teacher, acts, self.config.seed))
            pre, target = embedding_norm_data(teacher, mobile, acts, self.config.seed)
            report["norm_fit_r2"] = linalg.fit_norm(mobile.mobilebert.embeddings.LayerNorm, pre, target)
            return report
        te, me = teacher.bert.embeddings, mobile.mobilebert.embeddings
        e = mobile.config.embedding_size
        word = te.word_embeddings.weight.to(F64)
        u, s, vt = torch.linalg.svd(word, full_matrices=False)
        me.word_embeddings.weight.copy_((u[:, :e] * s[:e]).float() + 0.0)
        w = torch.zeros_like(me.embedding_transformation.weight, dtype=F64)
        w[:, e:2 * e] = vt[:e].T  # trigram input = [next token, this token, previous token]
        me.embedding_transformation.weight.copy_(w.float() + 0.0)
        me.embedding_transformation.bias.zero_()
        me.position_embeddings.weight.copy_(te.position_embeddings.weight)
        me.token_type_embeddings.weight.copy_(te.token_type_embeddings.weight)
        pre, target = embedding_norm_data(teacher, mobile, acts, self.config.seed)
        fit = linalg.fit_norm(me.LayerNorm, pre, target)
        dropped = s[e:]
        return {"svd_rank": e, "energy_retained": float((s[:e] ** 2).sum() / (s ** 2).sum()),
                "frobenius_error": float(dropped.pow(2).sum().sqrt()), "norm_fit_r2": fit}


DERIVED_FIELDS = ("hidden_size", "intra_bottleneck_size", "num_attention_heads", "intermediate_size",
                  "num_feedforward_networks", "embedding_size", "normalization_type", "hidden_act",
                  "num_hidden_layers", "vocab_size", "num_labels")


def default_heads(bottleneck: int, source_heads: int) -> int:
    """MobileBERT's head size is 32 (4 heads for b = 128); never more heads than the source has."""
    heads = max(1, min(bottleneck // 32, source_heads))
    while bottleneck % heads:
        heads -= 1
    return heads


def copy_(dst: nn.Linear, src: nn.Linear) -> None:
    assert dst.weight.shape == src.weight.shape, (dst.weight.shape, src.weight.shape)
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


# -------------------------------------------------------------------- calibration activations
def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


class TeacherActivations:
    """The student's hidden states, post-attention states and layer outputs on calibration text."""

    def __init__(self, teacher, calib: Encoded):
        batch = calib.batch(slice(None))
        self.mask = batch["attention_mask"].bool()
        self.mask4d = additive_mask(batch["attention_mask"])
        self.batch = batch
        self.tokens = int(self.mask.sum())
        post_attention = []
        hooks = [layer.attention.output.register_forward_hook(lambda m, i, o: post_attention.append(o))
                 for layer in teacher.bert.encoder.layer]
        try:
            out = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        self.hidden = out.hidden_states
        self.post_attention = post_attention

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.mask]

    def layer(self, i: int) -> LayerActivations:
        """Layer i's activations: flattened to real tokens (x, s, out) plus the padded input sequence."""
        return LayerActivations(x=self.flat(self.hidden[i]), s=self.flat(self.post_attention[i]),
                                out=self.flat(self.hidden[i + 1]), x_seq=self.hidden[i], mask=self.mask,
                                mask4d=self.mask4d)


def embedding_tokens(teacher, acts, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, token_type_ids, mask) of the calibration texts; without calibration text, tokens drawn
    uniformly from the vocabulary at random positions: the embedding tables alone define their statistics."""
    if acts is not None:
        return acts.batch["input_ids"], acts.batch["token_type_ids"], acts.mask
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, teacher.config.vocab_size, (64, 64), generator=g)
    return ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)


def embedding_norm_data(teacher, mobile, acts, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(MobileBERT's pre-norm embedding sum, the source's embedding output) on the same tokens (embedding_tokens)."""
    ids, types, mask = embedding_tokens(teacher, acts, seed)
    captured = []
    hook = mobile.mobilebert.embeddings.LayerNorm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        mobile.mobilebert.embeddings(input_ids=ids, token_type_ids=types)
    finally:
        hook.remove()
    target = teacher.bert.embeddings(input_ids=ids, token_type_ids=types)
    return captured[0][mask], target[mask]


def embeddings_output(mobile, calib: Encoded) -> torch.Tensor:
    b = calib.batch(slice(None))
    return mobile.mobilebert.embeddings(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"])


# -------------------------------------------------------------------- importance
def taylor_importance(teacher, calib: Encoded, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Michel et al. (2019) head importance and its FFN-neuron analogue: E|∂loss/∂gate| with every gate
    at 1, the loss being cross-entropy against the labels (or the source's own predictions)."""
    c = teacher.config
    d = c.hidden_size // c.num_attention_heads
    head_gate = torch.ones(c.num_hidden_layers, c.num_attention_heads, requires_grad=True)
    neuron_gate = torch.ones(c.num_hidden_layers, c.intermediate_size, requires_grad=True)
    hooks = []
    for i, layer in enumerate(teacher.bert.encoder.layer):
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda m, a, i=i: (a[0] * head_gate[i].repeat_interleave(d),)))
        hooks.append(layer.output.dense.register_forward_pre_hook(lambda m, a, i=i: (a[0] * neuron_gate[i],)))
    heads = torch.zeros(c.num_hidden_layers, c.num_attention_heads)
    neurons = torch.zeros(c.num_hidden_layers, c.intermediate_size)
    try:
        with torch.enable_grad():
            for batch in calib.batches(batch_size):
                logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                labels = batch.get("labels", logits.argmax(-1).detach())
                loss = nn.functional.cross_entropy(logits, labels)
                gh, gn = torch.autograd.grad(loss, [head_gate, neuron_gate])
                heads += gh.abs()
                neurons += gn.abs()
    finally:
        for h in hooks:
            h.remove()
    return heads, neurons


def weight_importance(teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free proxies: ‖W_o·W_v‖·‖W_qᵀ·W_k‖ per head, ‖w_in‖·‖w_out‖ per neuron."""
    c = teacher.config
    d = c.hidden_size // c.num_attention_heads
    heads, neurons = [], []
    for layer in teacher.bert.encoder.layer:
        att = layer.attention
        wq, wk, wv = att.self.query.weight, att.self.key.weight, att.self.value.weight
        wo = att.output.dense.weight
        heads.append(torch.stack([
            (wo[:, j * d:(j + 1) * d] @ wv[j * d:(j + 1) * d]).norm() * (wq[j * d:(j + 1) * d].T @ wk[j * d:(j + 1) * d]).norm()
            for j in range(c.num_attention_heads)]))
        neurons.append(layer.intermediate.dense.weight.norm(dim=1) * layer.output.dense.weight.norm(dim=0))
    return torch.stack(heads), torch.stack(neurons)


# -------------------------------------------------------------------- end to end
def evaluate_mapping(teacher, mobile, encoded: Encoded, seed: int = 0) -> dict:
    """Agreement and per-layer cosine vs the source, for the mapped model and a random init."""
    from .similarity import compare

    torch.manual_seed(seed)
    random_init = MobileBertForSequenceClassification(mobile.config).eval()
    result = {}
    for name, model in (("converted", mobile), ("random_init", random_init)):
        cmp = compare(teacher, model, encoded, attentions=False)
        result[name] = {"agreement": cmp.agreement, "layer_cosine": cmp.layer_cosine,
                        "layer_rel_mse": cmp.layer_rel_mse}
        if encoded.labels is not None:
            result[name]["accuracy"] = float((cmp.logits_b.argmax(-1) == encoded.labels).float().mean())
            result["source_accuracy"] = float((cmp.logits_a.argmax(-1) == encoded.labels).float().mean())
    result["texts"] = len(encoded)
    return result
