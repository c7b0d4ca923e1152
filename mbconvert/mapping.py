"""Stage 2 — map: the MobileBERTAdapter turns a BERT classifier into a MobileBertForSequenceClassification.

The two blocks differ in shape, so weights cannot be copied; each piece is derived and, given
calibration text, fitted to the student's own activations (least squares on real tokens):

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
- LayerNorm→NoNorm: every norm's per-feature scale/shift is fitted by least squares to what the student
  computes at that point (linearised LayerNorm, γ/σ̄ and β, without data).
- With data, every projection is then refitted by ridge least squares on the MobileBERT's own inputs
  (layer by layer, so errors of earlier layers are corrected, not compounded).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers import BertForSequenceClassification, MobileBertConfig, MobileBertForSequenceClassification

from . import linalg
from .config import ConvertConfig
from .data import Encoded
from .errors import ConfigError
from .linalg import F64
from .load import SourceModel

log = logging.getLogger("mbconvert")


class MobileBERTAdapter:
    """Maps a BERT-family classifier (canonical BertForSequenceClassification) into MobileBERT."""

    def __init__(self, config: ConvertConfig | None = None):
        self.config = config or ConvertConfig()

    # ---------------------------------------------------------------- target shape
    def embedding_size(self, src) -> int:
        """The factorised embedding width: the config's, else MobileBERT's 128 (at most the source's hidden size)."""
        return self.config.embedding_size or min(128, src.hidden_size)

    def target_config(self, src) -> MobileBertConfig:
        c, H = self.config, src.hidden_size
        if not 0 < c.bottleneck < H:
            raise ConfigError(f"bottleneck {c.bottleneck} must be smaller than the student's hidden size {H}")
        if c.ffn < 1:
            raise ConfigError("--ffn must be at least 1")
        e = self.embedding_size(src)
        if not 0 < e <= min(H, src.vocab_size):
            raise ConfigError(f"embedding size {e} must be in 1..{min(H, src.vocab_size)}")
        heads = c.heads_out or default_heads(c.bottleneck, src.num_attention_heads)
        if heads > src.num_attention_heads:
            raise ConfigError(f"--heads-out {heads} exceeds the student's {src.num_attention_heads} heads")
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
        for i in range(mc.num_hidden_layers):
            step = LayerMapper(self.config, teacher.bert.encoder.layer[i], mobile.mobilebert.encoder.layer[i], mc,
                               heads_imp[i], neurons_imp[i])
            layer_report, x_mobile = step.run(acts.layer(i) if acts else None, x_mobile,
                                              acts.mask4d if acts else None)
            report["layers"].append(layer_report)
        copy_(mobile.mobilebert.pooler.dense, teacher.bert.pooler.dense)
        copy_(mobile.classifier, teacher.classifier)
        return mobile, report

    def _map_embeddings(self, teacher, mobile, acts) -> dict:
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
    """MobileBERT's head size is 32 (4 heads for b = 128); never more heads than the student has."""
    heads = max(1, min(bottleneck // 32, source_heads))
    while bottleneck % heads:
        heads -= 1
    return heads


def copy_(dst: nn.Linear, src: nn.Linear) -> None:
    assert dst.weight.shape == src.weight.shape, (dst.weight.shape, src.weight.shape)
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


def set_linear(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy in float32; `+ 0.0` turns −0.0 into +0.0 (LAPACK's sign of an exact zero is not stable, and
    the output bytes must be)."""
    assert layer.weight.shape == weight.shape, (layer.weight.shape, weight.shape)
    layer.weight.copy_(weight.float() + 0.0)
    layer.bias.copy_(torch.zeros(weight.shape[0]) if bias is None else bias.float() + 0.0)


def set_identity_norm(norm: nn.Module) -> None:
    norm.weight.fill_(1.0)
    norm.bias.zero_()


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

    def layer(self, i: int) -> dict:
        """Layer i's activations: flattened to real tokens (x, s, out) plus the padded input sequence."""
        return {"x": self.flat(self.hidden[i]), "s": self.flat(self.post_attention[i]),
                "out": self.flat(self.hidden[i + 1]), "x_seq": self.hidden[i], "mask": self.mask,
                "mask4d": self.mask4d, "flat": self.flat}


def embedding_norm_data(teacher, mobile, acts, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(MobileBERT's pre-norm embedding sum, BERT's embedding output) on the same tokens.

    Without calibration text, tokens are drawn uniformly from the vocabulary at random positions:
    the embedding tables alone define these statistics, no text is needed."""
    if acts is not None:
        ids, types = acts.batch["input_ids"], acts.batch["token_type_ids"]
        mask = acts.mask
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, teacher.config.vocab_size, (64, 64), generator=g)
        types = torch.zeros_like(ids)
        mask = torch.ones_like(ids, dtype=torch.bool)
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
    at 1, the loss being cross-entropy against the labels (or the student's own predictions)."""
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


# -------------------------------------------------------------------- one layer
class LayerMapper:
    """Maps one BERT layer onto one MobileBERT layer; `run` fits it on calibration activations."""

    def __init__(self, cfg: ConvertConfig, t_layer, m_layer, mc: MobileBertConfig, head_importance, neuron_importance):
        self.cfg, self.t, self.m, self.mc = cfg, t_layer, m_layer, mc
        self.head_importance, self.neuron_importance = head_importance, neuron_importance
        self.H, self.b = mc.hidden_size, mc.intra_bottleneck_size
        self.A = t_layer.attention.self.num_attention_heads
        self.d = self.H // self.A
        self.heads = mc.num_attention_heads
        self.d_out = self.b // self.heads
        self.act = {"relu": torch.relu, "gelu": nn.functional.gelu}[mc.hidden_act]
        self.report: dict = {}

    def w(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return linear.weight.to(F64), linear.bias.to(F64)

    def run(self, acts: dict | None, x_mobile: torch.Tensor | None, mask4d) -> tuple[dict, torch.Tensor | None]:
        t = self.t
        data = acts is not None
        s = acts["s"] if data else None
        w1, b1 = self.w(t.intermediate.dense)
        g1, be1 = t.attention.output.LayerNorm.weight.to(F64), t.attention.output.LayerNorm.bias.to(F64)
        g2, be2 = t.output.LayerNorm.weight.to(F64), t.output.LayerNorm.bias.to(F64)
        # the b-dim stream: coordinates of the post-attention state in its principal directions
        self.Q, energy = linalg.top_subspace(s, self.b, fallback=w1 * g1)
        self.mu = s.to(F64).mean(0) if data else be1
        sigma1 = self._ln_input_std(acts, "attention") if data else 1.0
        sigma2 = self._ln_input_std(acts, "output") if data else 1.0
        centre = torch.eye(self.H, dtype=F64) - 1.0 / self.H
        self.into_stream = self.Q @ torch.diag(g1 / sigma1) @ centre  # d(stream)/d(LN1 input), linearised
        self.report["stream_energy"] = energy
        xm = acts["flat"](x_mobile) if data else None
        z = self._attention(acts, x_mobile, xm, mask4d, be1)
        t_out = self._ffns(acts, z, s, w1, b1)
        out = self._output(acts, t_out, xm, g2 / sigma2, be2, centre)
        if not data:
            return self.report, None
        full = torch.zeros_like(x_mobile)  # back to (batch, tokens, H) for the next layer's attention
        full[acts["mask"]] = out.float()
        return self.report, full

    def _ln_input_std(self, acts, which: str) -> float:
        """Mean per-token std of the LayerNorm's input (to linearise LN as γ/σ̄·centre + β)."""
        x, s = acts["x"].to(F64), acts["s"].to(F64)
        if which == "attention":
            pre = x + self.t.attention.output.dense(self._teacher_context(acts)).to(F64)
        else:
            h = self.t.intermediate(s.float())
            pre = s + self.t.output.dense(h).to(F64)
        return float(pre.std(-1, unbiased=False).mean())

    def _teacher_context(self, acts) -> torch.Tensor:
        """The student's multi-head attention output (before its output projection), on real tokens."""
        if "context" not in acts:
            acts["context"] = acts["flat"](self.t.attention.self(acts["x_seq"], attention_mask=acts["mask4d"])[0])
        return acts["context"]

    # ---- attention ---------------------------------------------------------------------------
    def _qk_basis(self, g, xm):
        """The shared query/key bottleneck in whitened input coordinates: the b directions that best preserve
        the kept heads' q and k rows `g` (g·root's top right singular vectors). When the heads span fewer than
        b directions (small heads: 2 × head size × kept heads < b), the input's next principal directions fill
        the rest, so the basis is always b well-defined, deterministic directions.
        Returns (root, inv_root, basis (H × b), singular values)."""
        m2 = linalg.second_moment(xm, self.H)
        root, inv_root = linalg.sqrt_and_inv_sqrt(m2)
        _, sv, vt = torch.linalg.svd(g @ root, full_matrices=False)
        keep = linalg.significant(sv[: self.b], sv)
        # the plain view when the heads fill b: a copied (contiguous) basis would change BLAS's last bits
        basis = vt[: self.b].T if len(keep) == self.b and bool(keep.all()) else vt[: self.b][keep].T
        if basis.shape[1] < self.b:  # whitening keeps m2's eigenvectors: they are the input's principal axes
            vals, vecs = torch.linalg.eigh(m2)
            principal = vecs[:, torch.argsort(vals, descending=True, stable=True)]
            basis = linalg.complete_basis(basis, self.b, principal)
        return root, inv_root, basis, sv

    def _attention(self, acts, x_seq, xm, mask4d, be1) -> torch.Tensor | None:
        t, m, d, dd = self.t, self.m, self.d, self.d_out
        wq, bq = self.w(t.attention.self.query)
        wk, _ = self.w(t.attention.self.key)
        wv, bv = self.w(t.attention.self.value)
        wo, bo = self.w(t.attention.output.dense)
        kept = torch.argsort(self.head_importance, descending=True, stable=True)[: self.heads].sort().values
        rows = lambda j: slice(j * d, (j + 1) * d)  # noqa: E731
        g = torch.cat([torch.cat([wq[rows(j)], wk[rows(j)]]) for j in kept.tolist()])
        root, inv_root, basis, sv = self._qk_basis(g, xm)
        reduce, expand = basis.T @ inv_root, root @ basis  # u = reduce·x, x ≈ expand·u
        set_linear(m.bottleneck.attention.dense, reduce, None)
        set_identity_norm(m.bottleneck.attention.LayerNorm)
        wq_new, bq_new = torch.zeros(self.b, self.b, dtype=F64), torch.zeros(self.b, dtype=F64)
        wk_new, wv_new = torch.zeros_like(wq_new), torch.zeros(self.b, self.H, dtype=F64)
        wo_new = torch.zeros(self.b, self.b, dtype=F64)
        scale = math.sqrt(dd) / math.sqrt(d)  # BERT scores divide by √d, MobileBERT's by √d_out
        qk_energy, ov_energy = [], []
        bias = bo.clone()
        for slot, j in enumerate(kept.tolist()):
            qj, kj = wq[rows(j)] @ expand, wk[rows(j)] @ expand  # (d, b)
            left, right, e = linalg.low_rank(qj.T @ kj * scale, dd)  # scores ≈ uᵢᵀ·left·right·uⱼ
            out_rows = slice(slot * dd, (slot + 1) * dd)
            wq_new[out_rows], wk_new[out_rows] = left.T, right
            # the query bias adds bqᵀ·W_k·x_j to every score of key j: keep it through the new key map
            bq_new[out_rows] = torch.linalg.lstsq(right.T, (bq[rows(j)] @ kj) * scale).solution
            qk_energy.append(e)
            ov = self.into_stream @ wo[:, rows(j)] @ wv[rows(j)]  # (b, H), value→stream product
            left, right, e = linalg.low_rank(ov @ root, dd)
            wo_new[:, out_rows], wv_new[out_rows] = left, right @ inv_root
            ov_energy.append(e)
            bias = bias + wo[:, rows(j)] @ bv[rows(j)]
        mean_x = xm.to(F64).mean(0) if xm is not None else torch.zeros(self.H, dtype=F64)
        for j in sorted(set(range(self.A)) - set(kept.tolist())):  # a dropped head's average output
            bias = bias + wo[:, rows(j)] @ (wv[rows(j)] @ mean_x + bv[rows(j)])
        set_linear(m.attention.self.query, wq_new, bq_new)
        set_linear(m.attention.self.key, wk_new, None)
        set_linear(m.attention.self.value, wv_new, None)
        set_linear(m.attention.output.dense, wo_new, self.into_stream @ bias)
        set_linear(m.bottleneck.input.dense, self.into_stream, self.Q @ (be1 - self.mu))
        set_identity_norm(m.bottleneck.input.LayerNorm)
        set_identity_norm(m.attention.output.LayerNorm)
        self.report["attention"] = {
            "heads_kept": kept.tolist(),
            "importance_kept": float(self.head_importance[kept].sum() / self.head_importance.sum().clamp_min(1e-30)),
            "qk_bottleneck_energy": float((sv[: self.b] ** 2).sum() / (sv ** 2).sum().clamp_min(1e-30)),
            "qk_energy_per_head": qk_energy, "ov_energy_per_head": ov_energy}
        if acts is None:
            return None
        # refit the output projection and the input bottleneck jointly on the MobileBERT's own input
        flat = acts["flat"]
        layer_norm = self.mc.normalization_type == "layer_norm"
        if layer_norm:  # a LayerNorm cannot be the identity: fit it to pass its input through
            linalg.fit_norm(m.bottleneck.attention.LayerNorm, projected := m.bottleneck.attention.dense(xm), projected)
        u = m.bottleneck.attention(x_seq)
        context = flat(m.attention.self(u, u, x_seq, attention_mask=mask4d)[0])
        target = (acts["s"].to(F64) - self.mu) @ self.Q.T
        weight, bias_fit, r2 = linalg.lstsq(torch.cat([context, xm], 1), target, self.cfg.ridge)
        set_linear(m.attention.output.dense, weight[:, : self.b], bias_fit)
        set_linear(m.bottleneck.input.dense, weight[:, self.b:], None)
        layer_input = m.bottleneck.input(xm)
        if layer_norm:  # same for the input bottleneck, then refit the output projection around it
            linalg.fit_norm(m.bottleneck.input.LayerNorm, projected := m.bottleneck.input.dense(xm), projected)
            layer_input = m.bottleneck.input(xm)
            weight, bias_fit, r2 = linalg.lstsq(context, target - layer_input.to(F64), self.cfg.ridge)
            set_linear(m.attention.output.dense, weight, bias_fit)
        pre = m.attention.output.dense(context) + layer_input
        self.report["attention"]["fit_r2"] = linalg.fit_norm(m.attention.output.LayerNorm, pre, target)
        return m.attention.output.LayerNorm(pre)

    # ---- feed-forward networks ---------------------------------------------------------------
    def _ffns(self, acts, z, s, w1, b1) -> torch.Tensor | None:
        t, m, mc = self.t, self.m, self.mc
        w2, b2 = self.w(t.output.dense)
        n, size = mc.num_feedforward_networks, mc.intermediate_size
        groups = linalg.balanced_groups(self.neuron_importance, n, size)
        blocks = [(f.intermediate.dense, f.output.dense, f.output.LayerNorm) for f in m.ffn] if n > 1 else []
        blocks.append((m.intermediate.dense, m.output.dense, m.output.LayerNorm))
        total = float(self.neuron_importance.sum().clamp_min(1e-30))
        pre_all = s.to(F64) @ w1.T + b1 if s is not None else None
        partial = s.to(F64) if s is not None else None  # the student's state after the FFN groups so far
        report = {"neurons_kept": sum(len(g) for g in groups), "neurons_total": int(w1.shape[0]),
                  "importance_share_per_ffn": [], "relu_fit_r2": [], "fit_r2": []}
        for k, (group, (up, down, norm)) in enumerate(zip(groups, blocks)):
            idx = torch.tensor(group, dtype=torch.long)
            report["importance_share_per_ffn"].append(float(self.neuron_importance[idx].sum()) / total)
            last = k == len(blocks) - 1
            a = c = None
            if mc.hidden_act == "relu" and pre_all is not None:
                a, c, fit = linalg.relu_calibration(pre_all[:, idx], nn.functional.gelu)
                report["relu_fit_r2"].append(fit)
            a = torch.ones(len(group), dtype=F64) if a is None else a.to(F64)
            c = torch.zeros(len(group), dtype=F64) if c is None else c.to(F64)
            w_up = torch.zeros(size, self.b, dtype=F64)
            b_up = torch.zeros(size, dtype=F64)
            w_down = torch.zeros(self.b, size, dtype=F64)
            live = slice(0, len(group))
            w_up[live] = a[:, None] * (w1[idx] @ self.Q.T)
            b_up[live] = a * (b1[idx] + w1[idx] @ self.mu) + c
            w_down[:, live] = self.Q @ w2[:, idx]
            if len(group) < size:  # spare slots: small random inputs, zero outputs (trainable, inert now)
                w_up[len(group):] = torch.randn(size - len(group), self.b, dtype=F64,
                                                generator=torch.Generator().manual_seed(self.cfg.seed + k)) * 0.02
            set_linear(up, w_up, b_up)
            set_linear(down, w_down, self.Q @ b2 if last else None)
            set_identity_norm(norm)
            if z is None:
                continue
            # refit on the MobileBERT's own stream: first the neurons' (calibrated) pre-activations…
            target_pre = a * pre_all[:, idx] + c
            wfit, bfit, r2_up = linalg.lstsq(z, target_pre, self.cfg.ridge)
            w_up[live], b_up[live] = wfit, bfit
            set_linear(up, w_up, b_up)
            hidden = self.act(up(z))
            # …then the down-projection, to the student's state after this group of neurons
            partial = partial + nn.functional.gelu(pre_all[:, idx].float()).to(F64) @ w2[:, idx].T
            if last:
                partial = partial + b2
            target = (partial - self.mu) @ self.Q.T
            wfit, bfit, r2 = linalg.lstsq(hidden, target - z.to(F64), self.cfg.ridge)
            set_linear(down, wfit, bfit)
            pre = down(hidden) + z
            report["fit_r2"].append(linalg.fit_norm(norm, pre, target))
            z = norm(pre)
        self.report["ffn"] = report
        return z

    # ---- output bottleneck -------------------------------------------------------------------
    def _output(self, acts, t_out, xm, scale2, be2, centre) -> torch.Tensor | None:
        up, norm = self.m.output.bottleneck.dense, self.m.output.bottleneck.LayerNorm
        # linearised LN2: out ≈ γ₂/σ̄₂ ⊙ centre(Qᵀ·z + μ) + β₂
        weight = torch.diag(scale2) @ centre @ self.Q.T
        set_linear(up, weight, torch.diag(scale2) @ centre @ self.mu + be2)
        set_identity_norm(norm)
        if t_out is None:
            return None
        target = acts["out"].to(F64)
        goal = target - xm.to(F64)
        for _ in range(2):  # alternate: projection given the norm, norm given the projection
            wfit, bfit, _ = linalg.lstsq(t_out, goal, self.cfg.ridge)
            set_linear(up, wfit, bfit)
            fit = linalg.fit_norm(norm, up(t_out) + xm, target)
            if self.mc.normalization_type != "no_norm":
                break
            scale = norm.weight.to(F64)
            scale = torch.where(scale.abs() < 1e-3, torch.ones_like(scale), scale)
            goal = (target - norm.bias.to(F64)) / scale - xm.to(F64)  # what up(t) must be under this norm
        self.report["output_fit_r2"] = fit
        return norm(up(t_out) + xm)


# -------------------------------------------------------------------- end to end
def evaluate_mapping(teacher, mobile, encoded: Encoded, seed: int = 0) -> dict:
    """Agreement and per-layer cosine vs the student, for the mapped model and a random init."""
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
            result["student_accuracy"] = float((cmp.logits_a.argmax(-1) == encoded.labels).float().mean())
    result["texts"] = len(encoded)
    return result
