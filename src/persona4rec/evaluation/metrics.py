"""Leave-one-out ranking metrics: one relevant item per user.

With the held-out item at 1-based rank ``r`` (``inf`` when it is not ranked at all):

* ``HR@K   = 1 if r <= K else 0``
* ``MRR@K  = 1/r if r <= K else 0``
* ``NDCG@K = 1/log2(r + 1) if r <= K else 0`` (the ideal DCG is 1 with one relevant item)

Ranking order is descending score with ties broken by ascending item index, the same
order :func:`top_k` returns, so a metric always describes a list a user could be shown.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CUTOFFS = (5, 10, 20)


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of ``targets[u]`` in row ``scores[u]`` (``inf`` if its score is -inf or NaN).

    Excluded items should carry ``-inf``; they are never ranked above anything.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets][:, None]
    better = (scores > target_scores).sum(axis=1)
    item_index = np.arange(scores.shape[1])[None, :]
    tied_before = ((scores == target_scores) & (item_index < targets[:, None])).sum(axis=1)
    ranks = (1 + better + tied_before).astype(np.float64)
    ranks[~np.isfinite(target_scores[:, 0])] = np.inf
    return ranks


def ranks_from_lists(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based position of ``targets[u]`` in the list ``ranked[u]`` (``inf`` when absent).

    ``ranked`` is (n_users, L) of item indices, best first, padded with -1.
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    match = ranked == targets[:, None]
    found = match.any(axis=1)
    ranks = np.full(len(targets), np.inf)
    ranks[found] = match[found].argmax(axis=1) + 1
    return ranks


def hit_rate(ranks: np.ndarray, k: int) -> np.ndarray:
    return (np.asarray(ranks) <= k).astype(np.float64)


def mrr(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / ranks, 0.0)


def ndcg(ranks: np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    with np.errstate(divide="ignore"):
        gain = 1.0 / np.log2(np.where(ranks <= k, ranks, 1.0) + 1.0)
    return np.where(ranks <= k, gain, 0.0)


def per_user_metrics(ranks: np.ndarray, cutoffs: tuple[int, ...] = DEFAULT_CUTOFFS) -> dict[str, np.ndarray]:
    """Per-user values of HR, MRR and NDCG at each cutoff, keyed ``"NDCG@10"`` etc."""
    out: dict[str, np.ndarray] = {}
    for k in cutoffs:
        out[f"HR@{k}"] = hit_rate(ranks, k)
        out[f"MRR@{k}"] = mrr(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Item indices of the ``k`` best scores per row, best first; -inf slots become -1.

    Ties are broken by ascending item index (the order :func:`ranks_from_scores` uses).
    """
    scores = np.asarray(scores)
    n_items = scores.shape[1]
    k = min(k, n_items)
    # A stable sort of the negated scores keeps equal scores in item order.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(scores, order, axis=1)
    return np.where(np.isneginf(picked) | np.isnan(picked), -1, order).astype(np.int64)
