"""Linear-algebra pieces of the mapping, in float64: ridge least squares, norm fits, whitening, SVDs."""

from __future__ import annotations

import torch
from torch import nn

F64 = torch.float64


def lstsq(features: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge regression target ≈ features @ W.T + b. Returns (W, b, R²). The bias is not penalised.

    Solved on centred data so the ridge does not depend on the features' offset; `ridge` is relative to
    the mean feature variance.
    """
    x, y = features.to(F64), target.to(F64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * max(gram.diagonal().mean().item(), 1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=F64), xc.T @ yc).T
    b = my - w @ mx
    return w, b, r2(x @ w.T + b, y)


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Explained variance of target by pred (1 = perfect, 0 = no better than the mean)."""
    pred, target = pred.to(F64), target.to(F64)
    resid = ((target - pred) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum().clamp_min(1e-30)
    return float(1 - resid / total)


def norm_input(norm: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """What a norm's per-feature affine acts on: the input itself (NoNorm) or its standardised form."""
    if isinstance(norm, nn.LayerNorm):
        return nn.functional.layer_norm(pre.to(F64), pre.shape[-1:], eps=norm.eps)
    return pre.to(F64)


@torch.no_grad()
def fit_norm(norm: nn.Module, pre: torch.Tensor, target: torch.Tensor) -> float:
    """Per-feature least squares: weight_j, bias_j so that norm(pre)_j ≈ target_j. Returns R²."""
    x, y = norm_input(norm, pre), target.to(F64)
    mx, my = x.mean(0), y.mean(0)
    var = ((x - mx) ** 2).mean(0)
    cov = ((x - mx) * (y - my)).mean(0)
    scale = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.ones_like(var))
    shift = my - scale * mx
    norm.weight.copy_(scale.float() + 0.0)  # + 0.0: no −0.0, so output bytes are reproducible
    norm.bias.copy_(shift.float() + 0.0)
    return r2(x * scale + shift, y)


def second_moment(x: torch.Tensor | None, dim: int) -> torch.Tensor:
    """E[x xᵀ] of activations (rows are tokens); the identity when there is no data."""
    if x is None:
        return torch.eye(dim, dtype=F64)
    x = x.to(F64)
    return x.T @ x / x.shape[0]


def sqrt_and_inv_sqrt(m: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root of a PSD matrix and its (floored) inverse."""
    vals, vecs = torch.linalg.eigh(m.to(F64))
    vals = vals.clamp_min(floor * vals.max().clamp_min(1e-30))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


def top_subspace(x: torch.Tensor | None, k: int, fallback: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """k orthonormal principal directions (rows) of centred activations x, or of a weight matrix's
    input side (`fallback`'s right singular vectors) when there is no data. Returns (basis, energy kept).
    A fallback of rank < k (fewer rows than k, zero rows) is completed with identity directions."""
    if x is not None:
        xc = x.to(F64) - x.to(F64).mean(0)
        vals, vecs = torch.linalg.eigh(xc.T @ xc)
        order = torch.argsort(vals, descending=True)
        vals, vecs = vals[order].clamp_min(0), vecs[:, order]
        return vecs[:, :k].T.contiguous(), float(vals[:k].sum() / vals.sum().clamp_min(1e-30))
    _, s, vt = torch.linalg.svd(fallback.to(F64), full_matrices=False)
    basis = complete_basis(vt[:k][significant(s[:k], s)].T, k, torch.eye(vt.shape[1], dtype=F64))
    return basis.T.contiguous(), float((s[:k] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))


def significant(values: torch.Tensor, spectrum: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """Mask of singular values that are not numerically zero relative to the spectrum's largest."""
    top = float(spectrum.max()) if spectrum.numel() else 0.0
    return values > rtol * top if top > 0 else torch.zeros_like(values, dtype=torch.bool)


def complete_basis(basis: torch.Tensor, k: int, candidates: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Extend orthonormal columns `basis` (n × r) to k columns with the first `candidates` columns (in their
    order) that leave its span (Gram–Schmidt, twice for stability). Rank-deficient inputs (e.g. heads too
    small to fill a bottleneck) thus still give k well-defined, deterministic directions."""
    out = basis.to(F64)[:, :k]
    for c in candidates.to(F64).T:
        if out.shape[1] >= k:
            break
        v = c - out @ (out.T @ c)
        v = v - out @ (out.T @ v)
        norm = v.norm()
        if norm > tol:
            out = torch.cat([out, (v / norm)[:, None]], 1)
    if out.shape[1] < k:
        raise ValueError(f"cannot complete a basis of {k} directions in {basis.shape[0]} dimensions")
    return out


def low_rank(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """m ≈ left @ right with left (rows×rank), right (rank×cols), the singular values split evenly.
    Returns (left, right, energy kept). Pads with zeros when rank exceeds m's rank."""
    u, s, vt = torch.linalg.svd(m.to(F64), full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    left = torch.zeros(m.shape[0], rank, dtype=F64)
    right = torch.zeros(rank, m.shape[1], dtype=F64)
    left[:, :r] = u[:, :r] * root
    right[:r] = root[:, None] * vt[:r]
    return left, right, float((s[:r] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30))


def balanced_groups(importance: torch.Tensor, n_groups: int, group_size: int) -> list[list[int]]:
    """Split the most important n_groups × group_size items into equal-size groups with similar total
    importance (largest first, each to the lightest group that still has room)."""
    order = torch.argsort(importance.to(F64), descending=True, stable=True).tolist()[: n_groups * group_size]
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    totals = [0.0] * n_groups
    for idx in order:
        g = min((g for g in range(n_groups) if len(groups[g]) < group_size), key=lambda g: (totals[g], g))
        groups[g].append(idx)
        totals[g] += float(importance[idx])
    return [sorted(g) for g in groups]


def relu_calibration(pre: torch.Tensor | None, act, steps: int = 80, max_rows: int = 2048
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-neuron a, c so that relu(a·p + c) ≈ act(p) over the neuron's own pre-activations p.

    Two parameters per neuron need few tokens: at most `max_rows` (evenly strided) are used.
    Returns (a, c, R² of the fit). Without data, a = 1, c = 0 (plain swap).
    """
    if pre is None:
        return None, None, float("nan")
    p = pre.float()[:: max(1, pre.shape[0] // max_rows)]
    target = act(p)
    a = torch.ones(p.shape[1], requires_grad=True)
    c = torch.zeros(p.shape[1], requires_grad=True)
    opt = torch.optim.Adam([a, c], lr=0.03)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = ((torch.relu(a * p + c) - target) ** 2).mean(0).sum()
            loss.backward()
            opt.step()
    with torch.no_grad():
        fit = r2(torch.relu(a * p + c), target)
    return a.detach(), c.detach(), fit
