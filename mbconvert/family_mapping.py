"""The two mapping steps where a source family is not BERT (see mbconvert.canonical): a factorised embedding
(ELECTRA, ALBERT) and a head whose activation is not tanh (DistilBERT's ReLU, ELECTRA's GELU).

Factorised embedding. The source computes P·LN_E(w + p + t) + b_P with tables of width E; MobileBERT computes
Norm(T·[w_next, w, w_prev] + b_T + p_H + t_H). LayerNorm is linearised as LN_E(x) ≈ k·diag(γ)·C·x + β
(C centres x; k = Σσ/Σσ² over real tokens, the least-squares scale for 1/σ), so with M = k·P·diag(γ)·C the source
is ≈ M(w + p + t) + P·β + b_P: MobileBERT's word table is the source's own (when its width is E; otherwise the
rank-e SVD of the effective table W·Mᵀ), the centre block of T is M, p_H = p·Mᵀ, t_H = t·Mᵀ and b_T = P·β + b_P.
The embedding norm is then fitted to the source's real output, as for BERT.

Head. MobileBERT's pooler is dense → tanh. A source head act(W·x + b) (ReLU, GELU) is matched neuron by neuron:
act(q) ≈ α·tanh(a·q + c) + d over the neuron's own pre-activations q on the calibration texts' first-token states
(random token sequences without data); a, c go into the pooler's dense layer and α, d into the classifier.
"""

from __future__ import annotations

import torch

from .canonical import head_activation, is_factorised
from .linalg import F64, r2


def describe(config, family: str) -> dict:
    """What conversion.json says of a family: which parts map as for BERT and which are fitted differently."""
    layers = "BERT's post-LN layers: renamed, then mapped as for BERT"
    if family == "albert":
        layers = f"one shared layer unrolled over {config.num_hidden_layers} depths, then mapped as for BERT"
    embedding = "BERT's: truncated SVD of the word table, norm fitted"
    if is_factorised(config):
        embedding = (f"factorised (width {config.embedding_size}): the source's tables and projection mapped onto "
                     "MobileBERT's embedding transformation, its LayerNorm linearised, norm fitted")
    act = head_activation(config)
    head = ("dense → tanh pooler and classifier copied exactly" if act == "tanh" else
            f"{act} head fitted per neuron onto MobileBERT's dense → tanh pooler (α·tanh(a·q + c) + d)")
    return {"layers": layers, "embedding": embedding, "head": head}


# -------------------------------------------------------------------- embeddings
def factorised_embedding(teacher, mobile, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> dict:
    """Write MobileBERT's word table, embedding transformation, position and type tables from a factorised source
    embedding (module docstring). `ids`, `types`, `mask`: tokens on which LayerNorm's scale is measured."""
    te, me = teacher.bert.embeddings, mobile.mobilebert.embeddings
    e, width = mobile.config.embedding_size, te.word_embeddings.weight.shape[1]
    k = layer_norm_scale(te, ids, types, mask)
    gamma, beta = te.LayerNorm.weight.to(F64), te.LayerNorm.bias.to(F64)
    centre = torch.eye(width, dtype=F64) - 1.0 / width
    proj_w, proj_b = te.projection.weight.to(F64), te.projection.bias.to(F64)
    m = k * proj_w @ torch.diag(gamma) @ centre  # H × E
    word = te.word_embeddings.weight.to(F64)
    t = torch.zeros_like(me.embedding_transformation.weight, dtype=F64)
    report = {"factorised_source": {"source_width": width, "layer_norm_scale": k}}
    if e == width:  # the source's own table, unchanged
        me.word_embeddings.weight.copy_(word.float() + 0.0)
        t[:, e:2 * e] = m
        report.update(svd_rank=e, energy_retained=1.0, frobenius_error=0.0)
    else:  # a narrower MobileBERT table: rank-e SVD of the effective H-wide table
        u, s, vt = torch.linalg.svd(word @ m.T, full_matrices=False)
        me.word_embeddings.weight.copy_((u[:, :e] * s[:e]).float() + 0.0)
        t[:, e:2 * e] = vt[:e].T
        report.update(svd_rank=e, energy_retained=float((s[:e] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30)),
                      frobenius_error=float(s[e:].pow(2).sum().sqrt()))
    me.embedding_transformation.weight.copy_(t.float() + 0.0)
    me.embedding_transformation.bias.copy_((proj_w @ beta + proj_b).float() + 0.0)
    me.position_embeddings.weight.copy_((te.position_embeddings.weight.to(F64) @ m.T).float() + 0.0)
    me.token_type_embeddings.weight.copy_((te.token_type_embeddings.weight.to(F64) @ m.T).float() + 0.0)
    return report


def layer_norm_scale(te, ids, types, mask) -> float:
    """k minimising Σ‖(x − x̄)/σ − k·(x − x̄)‖² over the real tokens' pre-LayerNorm sums x: Σσ/Σσ²."""
    captured = []
    hook = te.LayerNorm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        te(input_ids=ids, token_type_ids=types)
    finally:
        hook.remove()
    x = captured[0][mask].to(F64)
    sigma = (x.var(-1, unbiased=False) + te.LayerNorm.eps).sqrt()
    return float(sigma.sum() / sigma.pow(2).sum())


# -------------------------------------------------------------------- head
def needs_head_fit(teacher) -> bool:
    return head_activation(teacher.config) != "tanh"


def fit_head(teacher, mobile, first_token: torch.Tensor, steps: int = 300, max_rows: int = 2048) -> dict:
    """Map a ReLU/GELU head onto MobileBERT's dense → tanh pooler (module docstring). `first_token`: the source's
    last-layer state of the first token, one row per text."""
    dense, cls = teacher.bert.pooler.dense, teacher.classifier
    act = teacher.bert.pooler.activation
    x = first_token.float()[:: max(1, first_token.shape[0] // max_rows)]
    q = (x @ dense.weight.T + dense.bias).detach()
    a, c, alpha, d, fit = tanh_calibration(q, act, steps)
    md, mc = mobile.mobilebert.pooler.dense, mobile.classifier
    md.weight.copy_((a[:, None] * dense.weight.to(F64)).float() + 0.0)
    md.bias.copy_((a * dense.bias.to(F64) + c).float() + 0.0)
    mc.weight.copy_((cls.weight.to(F64) * alpha).float() + 0.0)
    mc.bias.copy_((cls.bias.to(F64) + cls.weight.to(F64) @ d).float() + 0.0)
    source_logits = act(q) @ cls.weight.T + cls.bias
    fitted_logits = torch.tanh(x @ md.weight.T + md.bias) @ mc.weight.T + mc.bias
    agreement = float((source_logits.argmax(-1) == fitted_logits.argmax(-1)).float().mean())
    return {"activation": head_activation(teacher.config), "rows": int(x.shape[0]), "tanh_fit_r2": fit,
            "logit_agreement": agreement}


def tanh_calibration(q: torch.Tensor, act, steps: int) -> tuple[torch.Tensor, ...]:
    """Per neuron (column of q): a, c, α, d with act(q) ≈ α·tanh(a·q + c) + d, fitted by Adam on the standardised
    pre-activations (α, d solved exactly at the end). Returns float64 a, c, α, d and the R² of the fit."""
    mean, std = q.mean(0), q.std(0, unbiased=False).clamp_min(1e-6)
    z = (q - mean) / std
    target = act(q)
    a_hat = torch.ones(q.shape[1], requires_grad=True)
    c_hat = torch.zeros(q.shape[1], requires_grad=True)
    alpha = target.std(0, unbiased=False).clamp_min(1e-6).clone().requires_grad_(True)
    d = target.mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([a_hat, c_hat, alpha, d], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = ((alpha * torch.tanh(a_hat * z + c_hat) + d - target) ** 2).mean(0).sum()
            loss.backward()
            opt.step()
    with torch.no_grad():
        f = torch.tanh(a_hat * z + c_hat).to(F64)
        y = target.to(F64)
        fm, ym = f.mean(0), y.mean(0)
        var = ((f - fm) ** 2).mean(0)
        alpha64 = torch.where(var > 1e-12, ((f - fm) * (y - ym)).mean(0) / var.clamp_min(1e-12), torch.zeros_like(var))
        d64 = ym - alpha64 * fm
        fit = r2(f * alpha64 + d64, y)
        a = a_hat.detach().to(F64) / std.to(F64)
        c = c_hat.detach().to(F64) - a * mean.to(F64)
    return a, c, alpha64, d64, fit


def first_token_states(teacher, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """The source's last-layer state of the first token (what its head reads)."""
    out = teacher.bert(input_ids=ids, attention_mask=mask.long(), token_type_ids=types)
    return out.last_hidden_state[:, 0]

