"""First-stage candidates, score fusion and reranking in the leave-one-out protocol."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from persona4rec.evaluation.metrics import top_k


def exclude_history(scores: np.ndarray, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """A float64 copy of ``scores`` with each user's history items set to -inf."""
    out = np.array(scores, dtype=np.float64, copy=True)
    rows = history[users].tocoo()
    out[rows.row, rows.col] = -np.inf
    return out


def candidate_lists(scores: np.ndarray, n: int) -> np.ndarray:
    """Top-``n`` item indices per user (best first) from history-excluded scores."""
    return top_k(scores, n)


def ceiling(candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per user, 1.0 when the held-out item is among the candidates (the rerank ceiling)."""
    return (candidates == np.asarray(targets)[:, None]).any(axis=1).astype(np.float64)


def minmax_rows(values: np.ndarray) -> np.ndarray:
    """Scale each row's finite values to [0, 1]; -inf stays -inf, constant rows become 0."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    low = np.where(finite, values, np.inf).min(axis=1, keepdims=True)
    high = np.where(finite, values, -np.inf).max(axis=1, keepdims=True)
    span = np.where(high > low, high - low, 1.0)
    scaled = np.where(finite, (values - low) / span, -np.inf)
    return np.where(np.isfinite(low), scaled, -np.inf)


def fuse(text_scores: np.ndarray, base_scores: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * text + (1 - alpha) * minmax(base)`` row-wise over the finite entries.

    This is the formula :meth:`persona4rec.PersonaIndex.rerank` serves (persona cosine
    as is, first-stage scores min-max scaled over the user's list), so the ``alpha``
    chosen here is the one to deploy. Entries that are -inf in either input stay -inf.
    """
    base = minmax_rows(base_scores)
    text = np.asarray(text_scores, dtype=np.float64)
    ok = np.isfinite(text) & np.isfinite(base)
    fused = alpha * np.where(ok, text, 0.0) + (1.0 - alpha) * np.where(ok, base, 0.0)
    return np.where(ok, fused, -np.inf)


def rerank(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Reorder each candidate list by ``scores`` (a full users x items matrix), best first.

    Padding (-1) stays at the end; ties keep the first stage's order.
    """
    safe = np.where(candidates >= 0, candidates, 0)
    picked = np.take_along_axis(np.asarray(scores, dtype=np.float64), safe, axis=1)
    picked = np.where(candidates >= 0, picked, -np.inf)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def gather(candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``scores[u, candidates[u, j]]`` with -inf for padding: the candidates' scores as a matrix."""
    safe = np.where(candidates >= 0, candidates, 0)
    picked = np.take_along_axis(np.asarray(scores, dtype=np.float64), safe, axis=1)
    return np.where(candidates >= 0, picked, -np.inf)


def fused_rerank(candidates: np.ndarray, text_scores: np.ndarray, base_scores: np.ndarray,
                 alpha: float) -> np.ndarray:
    """Rerank candidates by :func:`fuse` computed over each user's candidate list only."""
    fused = fuse(gather(candidates, text_scores), gather(candidates, base_scores), alpha)
    order = np.argsort(-fused, axis=1, kind="stable")
    reordered = np.take_along_axis(candidates, order, axis=1)
    return np.where(np.take_along_axis(fused, order, axis=1) == -np.inf, -1, reordered)
