"""Both protocols through the harness: choices on validation, the headline row, Holm, the temporal split."""

from __future__ import annotations

import numpy as np
import pytest

from persona4rec.data import ReviewTable
from persona4rec.evaluation.runner import Evaluation, EvaluationConfig
from persona4rec.evaluation.stats import holm_adjust
from test_eval_pipeline import FAST, HashEncoder


def spread_reviews(seed: int = 0, users: int = 60, items: int = 20, per_user: int = 7,
                   skew: bool = False) -> ReviewTable:
    """Synthetic reviews with many distinct times, so global time cuts have something to cut
    (``skew``: a long tail of items with few reviews, hence few personas)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) if skew else np.ones(items)
    words = ["bright", "warm", "cheap", "sturdy", "loud", "quiet", "smooth", "heavy", "light", "crisp"]
    rows = []
    for u in range(users):
        start = rng.uniform(0, 50)
        for k, i in enumerate(rng.choice(items, size=per_user, replace=False, p=weights / weights.sum())):
            text = " ".join(rng.choice(words, size=6)) + f" u{u} i{i}"
            rows.append((f"U{u}", f"I{i}", float(rng.integers(1, 6)), round(start + 8.0 * k, 1),
                         f"title u{u} i{i}", text))
    users_, items_, ratings, times, titles, texts = map(list, zip(*rows))
    return ReviewTable.from_columns(users_, items_, ratings, times, titles, texts)


def run(split: str, reviews: ReviewTable) -> tuple[dict, Evaluation]:
    evaluation = Evaluation(EvaluationConfig(k_core=1, split=split, candidate_sizes=(5, 10), latency_users=10,
                                             **{k: v for k, v in FAST.items() if k != "latency_users"}),
                            HashEncoder(), cache=False)
    return evaluation.run(reviews, None), evaluation


def test_holm_adjust_matches_the_textbook_procedure() -> None:
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.9, 0.8]).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("split", ["loo", "temporal"])
def test_headline_is_the_fused_setting_chosen_on_validation_and_pvalues_are_holm_corrected(split: str) -> None:
    report, evaluation = run(split, spread_reviews())
    fused = [m for m in report["methods"] if m["method"].startswith("fused persona")]
    assert {m["setting"] for m in fused} == {"rerank@5", "rerank@10", "full"}
    best_valid = max(m["valid"]["NDCG@10"] for m in fused)
    headline = report["methods"][0]
    assert headline.get("headline") and headline["method"].startswith("fused persona")
    assert headline["valid"]["NDCG@10"] == pytest.approx(best_valid, abs=1e-5)
    assert report["headline"]["setting"] == headline["setting"] == report["choices"]["fusion"]["setting"]
    assert sum(bool(m.get("headline")) for m in report["methods"]) == 1
    # The headline comparison leads the p-value family; Holm never lowers a p-value.
    first_stage = report["choices"]["first_stage"]["method"]
    assert report["p_values"][0]["a"] == f"{headline['method']} [{headline['setting']}]"
    assert report["p_values"][0]["b"] == f"{first_stage} [full]"
    assert all(p["p_value"] <= p["p_holm"] <= 1.0 for p in report["p_values"])
    assert report["protocol"]["protocol"] == split
    # The served Recommender (alpha and depth as chosen) returns exactly the lists the harness measured.
    assert report["recommender_agreement"]["same_top10"] == 1.0
    assert all(r["persona"] and r["persona_id"] for ex in report["examples"] for r in ex["recommendations"])


def test_choice_ignores_test_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the test set disagree with validation: the chosen fusion must not move.
    report, evaluation = run("loo", spread_reviews(1))
    chosen = evaluation.fusion.setting
    for r in evaluation.results:
        if r.name.startswith("fused") and r.setting != chosen:
            r.test_ranks = np.ones_like(r.test_ranks)  # perfect on test
    assert evaluation.choose_fusion().setting == chosen


def test_temporal_protocol_item_side_users_and_counts() -> None:
    reviews = spread_reviews(2)
    report, evaluation = run("temporal", reviews)
    d = evaluation.data
    split = d.split
    assert split.protocol == "temporal"
    # Nothing from on or after the first cut reaches the item side.
    ts = d.reviews.timestamp
    assert (ts[split.train] < split.valid_start).all()
    assert evaluation.personas.support.sum() <= len(split.train)
    # Histories: validation sees train only; test adds the validation period, never test-period rows.
    for rows in evaluation.valid_history_rows:
        assert (ts[rows] < split.valid_start).all() and len(rows) >= 1
    for rows, target in zip(evaluation.test_history_rows, split.test):
        assert (ts[rows] < split.test_start).all() and target not in rows
    counts = report["dataset"]["targets_no_cf_can_recommend"]
    train_items = set(d.review_item[split.train].tolist())
    assert counts["test"] == sum(int(t) not in train_items for t in d.test_targets)
    assert report["protocol"]["valid_users"] == len(split.valid)
    assert report["protocol"]["test_users"] == len(split.test)


def test_calibrated_persona_scores_do_not_grow_with_persona_count() -> None:
    report, evaluation = run("loo", spread_reviews(3, users=80, items=60, per_user=6, skew=True))
    ps = evaluation.personas
    counts = np.diff(ps.offsets)
    assert len(set(counts.tolist())) > 1  # items with different persona counts compete
    excess = {int(c): v for c, v in report["by_persona_count"]["max_sim_excess_over_single_vector_by_count"].items()}
    # Raw max-sim exceeds the single vector by more as the count grows (a max of more cosines) ...
    assert excess[max(excess)] > excess[min(excess)]
    # ... and the per-count offset removes exactly that on the data it was measured on.
    offset = np.array([excess[int(c)] for c in counts])
    raw = np.maximum.reduceat(evaluation.valid_profiles @ ps.vectors.T, ps.offsets[:-1], axis=1)
    calibrated_excess = raw - offset[None, :] - evaluation.valid_profiles @ evaluation.item_vectors.T
    for c in set(counts.tolist()):
        assert abs(calibrated_excess[:, counts == c].mean()) < 1e-5
    soft = next(m for m in report["methods"] if m["method"] == "persona soft-max")
    curve = soft["params"]["valid_ndcg@10_by_temperature"]
    assert soft["valid"]["NDCG@10"] == pytest.approx(max(curve.values()), abs=1e-5)
    groups = report["by_persona_count"]["by_target_persona_count"]
    assert sum(g["users"] for g in groups.values()) == len(evaluation.data.test_targets)


def test_persona_count_is_chosen_on_validation() -> None:
    report, evaluation = run("temporal", spread_reviews(4, users=80, items=40, per_user=7, skew=True))
    choice = report["choices"]["persona_count"]
    curve = {int(k): v for k, v in choice["valid_ndcg@10_by_max_personas"].items()}
    assert choice["chosen_on_validation"] and set(curve) == {1, 2, 3, 5, 8}
    best = max(curve, key=lambda n: (curve[n], -n))
    assert choice["max_personas"] == best == evaluation.personas.params["max_personas"]
    persona = next(m for m in report["methods"] if m["method"] == "persona max-sim")
    assert persona["valid"]["NDCG@10"] == pytest.approx(curve[best], abs=1e-5)


@pytest.mark.slow
def test_real_mi_5core_temporal_protocol_through_the_harness() -> None:
    import os
    from pathlib import Path

    shared = os.environ.get("PERSONA4REC_SHARED")
    if not shared or not (Path(shared) / "data" / "amazon-mi-5core").is_dir():
        pytest.skip("PERSONA4REC_SHARED is not set or has no data/amazon-mi-5core")
    evaluation = Evaluation(EvaluationConfig(split="temporal", max_personas_grid=(1, 5), latency_users=40,
                                             **{k: v for k, v in FAST.items() if k != "latency_users"}),
                            HashEncoder(), cache=False)
    report = evaluation.run()
    d = evaluation.data
    assert report["protocol"]["valid_users"] == 274 and report["protocol"]["test_users"] == 294
    # Items first reviewed after the first cut: no CF method can recommend them.
    assert report["dataset"]["targets_no_cf_can_recommend"] == {"valid": 0, "test": 34}
    for name in ("popularity", "ItemKNN", "EASE", "BPR"):
        cf = next(m for m in report["methods"] if m["method"] == name)
        assert cf["test"]["HR@20"]["mean"] <= 1 - 34 / 294 + 1e-9
    # Nothing from the validation period or later built an item vector or persona.
    assert evaluation.personas.support.sum() <= len(d.split.train)
    assert (d.reviews.timestamp[d.split.train] < d.split.valid_start).all()
    assert report["methods"][0].get("headline") and report["recommender_agreement"]["same_top10"] == 1.0
