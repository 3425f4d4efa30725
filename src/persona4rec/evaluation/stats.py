"""Bootstrap confidence intervals and paired bootstrap p-values over users."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its percentile bootstrap interval (users resampled)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    means = values[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


def paired_bootstrap_pvalue(a: np.ndarray, b: np.ndarray, n_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value for "mean(a) == mean(b)" from a paired bootstrap over users.

    The per-user differences are centred (so the null hypothesis holds) and resampled;
    the p-value is the share of resampled mean differences at least as far from zero
    as the observed one. With identical inputs it is 1.0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError("paired_bootstrap_pvalue needs two equal-length, non-empty per-user arrays")
    diff = a - b
    observed = diff.mean()
    centred = diff - observed
    rng = np.random.default_rng(seed)
    count = 0
    # Chunks keep memory flat for large user counts.
    chunk = max(1, min(n_resamples, 2_000_000 // max(1, len(diff))))
    done = 0
    while done < n_resamples:
        m = min(chunk, n_resamples - done)
        idx = rng.integers(0, len(diff), size=(m, len(diff)))
        count += int((np.abs(centred[idx].mean(axis=1)) >= abs(observed) - 1e-15).sum())
        done += m
    return (count + 1) / (n_resamples + 1)


def holm_adjust(p_values: "list[float] | np.ndarray") -> np.ndarray:
    """Holm-Bonferroni adjusted p-values over one family of comparisons (same order as given).

    The i-th smallest p-value is multiplied by ``m - i`` (0-based ``i``), a running maximum
    keeps the adjusted values monotone, and they are capped at 1. Rejecting where the
    adjusted value is below alpha controls the family-wise error rate at alpha.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("holm_adjust takes a 1-D list of p-values")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = scaled
    return out
