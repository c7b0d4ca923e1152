"""Classification statistics for the check stage and the training loops: metrics from a confusion matrix, and the
paired comparison of two classifiers on the same texts (accuracy difference in points, exact McNemar test,
paired-bootstrap interval, whether the test set can resolve the tolerance)."""

from __future__ import annotations

import math

import numpy as np
import torch

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CI_METHOD = (f"paired bootstrap over texts ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}), "
             "2.5th–97.5th percentile of the resampled difference")


def classification_metrics(pred: list[int], gold: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from one confusion matrix.

    Undefined ratios (no predictions or no support for a class) count as 0. Macro-F1 averages the classes
    that occur in the gold labels or the predictions, as scikit-learn does by default.
    """
    k = len(labels)
    p, g = torch.tensor(pred), torch.tensor(gold)
    confusion = torch.bincount(g * k + p, minlength=k * k).reshape(k, k)  # rows: gold, columns: predicted
    tp, support, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    per_class = []
    for i, name in enumerate(labels):
        precision = float(tp[i] / predicted[i]) if predicted[i] else 0.0
        recall = float(tp[i] / support[i]) if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"label": name, "precision": precision, "recall": recall, "f1": f1,
                          "support": int(support[i])})
    present = [c["f1"] for i, c in enumerate(per_class) if support[i] or predicted[i]]
    return {"accuracy": float(tp.sum()) / len(gold), "macro_f1": sum(present) / len(present),
            "per_class": per_class}


def paired_accuracy(source_correct, converted_correct, tolerance: float, two_sided: bool) -> dict:
    """The accuracy block of the report: Δ = converted − source in points, its uncertainty and the verdict.

    One-sided by default: only a drop of more than `tolerance` points fails (a better conversion passes);
    `two_sided` fails on |Δ| > tolerance. The warning (test set too small to resolve the tolerance) never changes
    the verdict. Inputs: per-text booleans, each model right or wrong on the same texts.
    """
    a, b = np.asarray(source_correct, bool), np.asarray(converted_correct, bool)
    n = len(a)
    difference = 100 * (int(b.sum()) - int(a.sum())) / n
    source_only, converted_only = int((a & ~b).sum()), int((b & ~a).sum())
    lo, hi = paired_bootstrap_ci(a, b)
    within = (abs(difference) if two_sided else -difference) <= tolerance + 1e-9  # inclusive, robust to rounding
    return {"source": float(a.mean()), "converted": float(b.mean()), "difference_points": difference,
            "ci95_points": [lo, hi], "ci_method": CI_METHOD, "mcnemar_p": mcnemar_exact_p(source_only, converted_only),
            "discordant": {"source_only_correct": source_only, "converted_only_correct": converted_only},
            "points_per_text": 100 / n, "within_tolerance": within, "warning": resolution_warning(n, tolerance, lo, hi)}


def mcnemar_exact_p(source_only: int, converted_only: int) -> float:
    """Exact two-sided McNemar test. If both models were equally accurate, each text only one of them gets right
    would favour either with probability 1/2: p = 2 · P(Binomial(b + c, 1/2) ≤ min(b, c)), capped at 1.
    Summed in log space, so it stays exact enough for any test-set size."""
    n, k = source_only + converted_only, min(source_only, converted_only)
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, 2 * math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def paired_bootstrap_ci(source_correct, converted_correct, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% interval of Δ accuracy (points) from resampling the texts with replacement, both models' outcomes kept
    together. Δ of a resample depends only on how many source-only and converted-only texts it drew, so each
    resample is one multinomial draw of those counts: the same distribution as resampling rows, in O(resamples)."""
    a, b = np.asarray(source_correct, bool), np.asarray(converted_correct, bool)
    n = len(a)
    p_src, p_conv = (a & ~b).sum() / n, (b & ~a).sum() / n
    draws = np.random.default_rng(seed).multinomial(n, [p_src, p_conv, max(0.0, 1 - p_src - p_conv)], resamples)
    lo, hi = np.percentile(100 * (draws[:, 1] - draws[:, 0]) / n, [2.5, 97.5])
    return float(lo) + 0.0, float(hi) + 0.0  # + 0.0 turns -0.0 into 0.0


def resolution_warning(n: int, tolerance: float, lo: float, hi: float) -> str | None:
    """Why `n` texts cannot resolve a `tolerance`-point difference, or None when they can."""
    per_text, half_width = 100 / n, (hi - lo) / 2
    reasons = []
    if per_text > tolerance / 2:
        need = f" (this tolerance needs {math.ceil(200 / tolerance)}+ texts)" if tolerance > 0 else ""
        reasons.append(f"{per_text:.2f} points per text, more than half the tolerance{need}")
    if half_width > tolerance:
        reasons.append(f"the 95% confidence interval of the difference is ±{half_width:.2f} points, wider than "
                       "the tolerance")
    if not reasons:
        return None
    return (f"test set too small for a {tolerance:g}-point tolerance ({n} texts): " + "; ".join(reasons)
            + "; the verdict is uncertain")


def top_disagreements(pred_a: list[int], pred_b: list[int], labels: list[str], k: int = 10) -> list[dict]:
    """The (source prediction → converted prediction) pairs that differ, most frequent first."""
    counts: dict[tuple[int, int], int] = {}
    for a, b in zip(pred_a, pred_b):
        if a != b:
            counts[(a, b)] = counts.get((a, b), 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [{"source": labels[a], "converted": labels[b], "count": n} for (a, b), n in ranked]
