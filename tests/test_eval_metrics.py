"""Metric definitions (hand-computed and cross-checked with ranx), top-k and statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from persona4rec.evaluation.metrics import (
    hit_rate,
    mrr,
    ndcg,
    per_user_metrics,
    ranks_from_lists,
    ranks_from_scores,
    top_k,
)
from persona4rec.evaluation.stats import bootstrap_ci, paired_bootstrap_pvalue


def test_hand_computed_leave_one_out_metrics() -> None:
    ranks = np.array([1, 2, 3, 10, 11, np.inf])
    assert hit_rate(ranks, 10).tolist() == [1, 1, 1, 1, 0, 0]
    assert mrr(ranks, 10).tolist() == pytest.approx([1, 0.5, 1 / 3, 0.1, 0, 0])
    assert ndcg(ranks, 10).tolist() == pytest.approx([1, 1 / math.log2(3), 0.5, 1 / math.log2(11), 0, 0])
    assert ndcg(ranks, 5).tolist() == pytest.approx([1, 1 / math.log2(3), 0.5, 0, 0, 0])
    table = per_user_metrics(ranks, (5, 10))
    assert set(table) == {"HR@5", "MRR@5", "NDCG@5", "HR@10", "MRR@10", "NDCG@10"}
    assert table["HR@5"].mean() == pytest.approx(0.5)


def test_ranks_from_scores_ties_exclusions_and_agreement_with_top_k() -> None:
    scores = np.array([[0.5, 0.9, 0.5, -np.inf, 0.1],
                       [0.2, 0.2, 0.2, 0.2, 0.2],
                       [1.0, -np.inf, 0.0, 0.0, 0.0]])
    targets = np.array([2, 3, 1])
    ranks = ranks_from_scores(scores, targets)
    # Row 0: 0.9 beats it, item 0 ties with a lower index -> rank 3.
    # Row 1: all tie; item 3 has three lower indices -> rank 4. Row 2: excluded -> never ranked.
    assert ranks.tolist() == [3.0, 4.0, math.inf]
    lists = top_k(scores, 5)
    assert lists[0].tolist() == [1, 0, 2, 4, -1]
    assert lists[2].tolist() == [0, 2, 3, 4, -1]
    from_lists = ranks_from_lists(lists, targets)
    assert from_lists.tolist() == ranks.tolist()


@pytest.mark.slow  # ranx JIT-compiles every metric on import: minutes on a busy 2-core machine
def test_against_ranx_on_random_runs() -> None:
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(3)
    scores = rng.random((40, 30))
    scores[rng.random((40, 30)) < 0.2] = -np.inf
    targets = rng.integers(0, 30, size=40)
    scores[np.arange(40), targets] = rng.random(40)  # every target is rankable
    ranks = ranks_from_scores(scores, targets)
    qrels = ranx.Qrels({f"u{u}": {f"i{targets[u]}": 1} for u in range(40)})
    run = ranx.Run({f"u{u}": {f"i{i}": float(scores[u, i]) for i in range(30) if np.isfinite(scores[u, i])}
                    for u in range(40)})
    theirs = ranx.evaluate(qrels, run, ["hit_rate@5", "mrr@10", "ndcg@10", "ndcg@20"])
    assert hit_rate(ranks, 5).mean() == pytest.approx(theirs["hit_rate@5"])
    assert mrr(ranks, 10).mean() == pytest.approx(theirs["mrr@10"])
    assert ndcg(ranks, 10).mean() == pytest.approx(theirs["ndcg@10"])
    assert ndcg(ranks, 20).mean() == pytest.approx(theirs["ndcg@20"])


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_users() -> None:
    rng = np.random.default_rng(0)
    small = rng.random(50)
    large = rng.random(5000)
    mean, low, high = bootstrap_ci(small, 1000, seed=1)
    assert low < mean < high and mean == pytest.approx(small.mean())
    _, low_l, high_l = bootstrap_ci(large, 1000, seed=1)
    assert (high_l - low_l) < (high - low) / 4
    # For a Bernoulli(0.5) mean over 5000 users the 95% half-width is about 1.96 * 0.5 / sqrt(5000).
    coin = (rng.random(5000) < 0.5).astype(float)
    _, lo, hi = bootstrap_ci(coin, 2000, seed=2)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.5 / math.sqrt(5000), rel=0.15)


def test_paired_pvalue_detects_real_differences_only() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(400)
    assert paired_bootstrap_pvalue(a, a.copy(), 2000) == 1.0
    noise = a + rng.normal(0, 0.3, 400)
    assert paired_bootstrap_pvalue(noise, a, 2000) > 0.05
    assert paired_bootstrap_pvalue(a + 0.05, a + rng.normal(0, 0.01, 400), 2000) < 0.01
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap_pvalue(a, a[:10])
