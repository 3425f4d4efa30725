"""The alignment experiment on the evaluation harness: leakage-free pairs, held-out selection, end to end."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from persona4rec.train import Adapter, AdapterConfig
from persona4rec.evaluation.alignment import (
    format_table,
    persona_set,
    prepare_evaluation,
    rank_phase,
    run_experiment,
    training_histories,
    training_pairs,
    validation_selection,
)


class _HashEncoder:
    """A deterministic bag-of-words stand-in for the ONNX encoder (no model files needed)."""

    dim = 32
    fingerprint = "hash-bow-test"

    def encode(self, texts, batch_size=32):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                h = int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little")
                out[i, h % self.dim] += 1.0 + (h >> 8) % 3
            out[i] /= max(np.linalg.norm(out[i]), 1e-6)
        return out


def _write_dataset(root, n_users=30, n_items=12, seed=0):
    rng = np.random.default_rng(seed)
    words = ["tone", "strings", "pedal", "cable", "tuner", "strap", "pick", "amp", "noise", "cheap", "solid", "bright"]
    rows = []
    for u in range(n_users):
        likes = rng.choice(len(words), 3, replace=False)
        for k, it in enumerate(rng.choice(n_items, 6, replace=False)):
            text = " ".join(words[j] for j in rng.choice(likes, 4)) + f" item{it}"
            rows.append({"reviewerID": f"U{u}", "asin": f"A{it:03d}", "reviewerName": "x", "helpful": [0, 0],
                         "reviewText": text, "overall": 5.0, "summary": words[likes[0]],
                         "unixReviewTime": 1_300_000_000 + 86400 * (k + u % 3), "reviewTime": "01 1, 2011"})
    with gzip.open(root / "reviews_Musical_Instruments_5.json.gz", "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    with open(root / "items.csv", "w", encoding="utf-8") as fh:
        fh.write("Product ID,Description,price,Category\n")
        for it in range(n_items):
            fh.write(f"A{it:03d},Product {it},9.99,Picks\n")



@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    from persona4rec.evaluation.runner import EvaluationConfig

    root = tmp_path_factory.mktemp("data") / "amazon-mi-5core"
    root.mkdir()
    _write_dataset(root)
    config = EvaluationConfig(data_dir=str(root), k_core=1, n_bootstrap=200)
    return prepare_evaluation(config, _HashEncoder(), cache=False)


def test_training_histories_are_strictly_earlier_train_reviews(evaluation):
    ev = evaluation
    d = ev.data
    targets, histories = training_histories(ev)
    train = set(d.split.train.tolist())
    position = {int(r): k for k, r in enumerate(d.split.chronological)}
    assert len(targets) == len(train) - len(set(d.review_user[d.split.train].tolist()))
    for t, h in zip(targets, histories):
        assert int(t) in train and set(h.tolist()) <= train
        assert all(d.review_user[r] == d.review_user[t] and position[int(r)] < position[int(t)] for r in h)
        # every earlier train review of the user is in the history
        earlier = [r for r in train if d.review_user[r] == d.review_user[t] and position[r] < position[int(t)]]
        assert sorted(earlier) == sorted(h.tolist())
    assert not (set(targets.tolist()) & (set(d.split.valid.tolist()) | set(d.split.test.tolist())))


@pytest.mark.parametrize("kind", ["extractive", "reviews"])
def test_training_pairs_labels_and_exclusions(evaluation, kind):
    ev = evaluation
    d = ev.data
    personas, source = persona_set(ev, kind)
    pairs = training_pairs(ev, kind)
    targets, histories = training_histories(ev)
    assert 0 < len(pairs) <= len(targets)
    for k in range(len(pairs)):
        it = pairs.item_ids[k]
        assert personas.offsets[it] <= pairs.positive_ids[k] < personas.offsets[it + 1]
    if kind == "reviews":
        # each persona is one train review; the pair's own review is neither label nor hard negative
        assert np.all(source >= 0)
        assert set(source.tolist()) <= set(d.split.train.tolist())
        target_of = {(int(d.review_user[t]), int(d.review_item[t])): int(t) for t in targets}
        for k in range(len(pairs)):
            own = target_of[(int(pairs.user_ids[k]), int(pairs.item_ids[k]))]
            assert source[pairs.positive_ids[k]] != own
            own_vec = personas.vectors[source == own][0]
            hard = pairs.hard_negatives[k][pairs.hard_valid[k]]
            assert not np.any(np.all(hard == own_vec, axis=1))


def test_identity_ranking_reproduces_the_harness_persona_score(evaluation):
    from persona4rec.evaluation.metrics import ranks_from_scores
    from persona4rec.evaluation.runner import index_scores, make_index

    ev = evaluation
    d = ev.data
    scores = index_scores(make_index(ev.personas), ev.test_profiles, d.test_history, d.eval_users)
    expect = ranks_from_scores(scores, d.test_targets)
    got = rank_phase(ev, ev.personas, Adapter.identity(ev.encoder.dim), "test")
    np.testing.assert_array_equal(got, expect)
    with pytest.raises(ValueError, match="phase"):
        rank_phase(ev, ev.personas, Adapter.identity(ev.encoder.dim), "train")


def test_heldout_selection_of_a_perfect_profile_is_one(evaluation):
    ev = evaluation
    personas, _ = persona_set(ev, "reviews")
    sel = validation_selection(ev, "reviews")
    assert len(sel.items) == len(ev.data.split.valid)
    perfect = type(sel)(personas.vectors[np.maximum(sel.positive, 0)], sel.items, sel.positive)
    acc, n, chance = perfect.accuracy(Adapter.identity(ev.encoder.dim), personas.vectors, personas.offsets)
    assert n > 0 and acc == 1.0 and 0 < chance < 1
    acc0, n0, _ = sel.accuracy(Adapter.identity(ev.encoder.dim), personas.vectors, personas.offsets)
    assert n0 == n and 0.0 <= acc0 < 1.0


def test_end_to_end_on_a_small_dataset(evaluation, tmp_path):
    cfg = AdapterConfig(epochs=3, batch_size=16, lr=1e-2)
    out = tmp_path / "run"
    summary = run_experiment(evaluation, persona_kind="extractive", config=cfg,
                             variants={"adapter": {}, "adapter+persona_side": {"persona_side": True}}, out_dir=out)
    assert set(summary["results"]) == {"none", "adapter", "adapter+persona_side"}
    none, trained = summary["results"]["none"], summary["results"]["adapter"]
    assert "p_vs_none" in trained["test_NDCG@10"] and "p_vs_none" not in none["test_NDCG@10"]
    lo, hi = none["test_NDCG@10"]["ci95"]
    assert lo <= none["test_NDCG@10"]["mean"] <= hi
    # early stopping on validation NDCG keeps the best epoch, the identity (epoch 0) included
    for name in ("adapter", "adapter+persona_side"):
        assert summary["results"][name]["val_NDCG@10"] >= none["val_NDCG@10"] - 1e-12
    assert (out / "extractive-adapter.npz").is_file() and (out / "extractive-adapter.report.json").is_file()
    on_disk = json.loads((out / "extractive-evaluation.json").read_text())
    assert on_disk["data"]["train_pairs"] == summary["data"]["train_pairs"] > 0
    assert "| adapter |" in format_table(summary)
    assert Adapter.load(out / "extractive-adapter+persona_side.npz").has_persona_map


def test_cli_is_registered_and_parses():
    from persona4rec.cli import build_parser

    args = build_parser().parse_args(["train-adapter", "--out", "x", "--variants", "adapter", "--rank", "16"])
    assert args.rank == 16 and args.personas == "extractive,reviews" and args.tie_break == "random"


def test_validation_only_run_never_ranks_test(evaluation, monkeypatch):
    import persona4rec.evaluation.alignment as ex

    real = ex.rank_phase
    phases = []

    def spy(ev, personas, adapter, phase):
        phases.append(phase)
        return real(ev, personas, adapter, phase)

    monkeypatch.setattr(ex, "rank_phase", spy)
    summary = run_experiment(evaluation, config=AdapterConfig(epochs=1, batch_size=16), variants={"adapter": {}},
                             evaluate_test=False)
    assert phases and set(phases) == {"valid"}
    assert "test_NDCG@10" not in summary["results"]["none"] and not summary["test_evaluated"]
    assert "| none |" in format_table(summary)


def test_fusion_with_ease_chooses_alpha_on_validation(evaluation):
    import persona4rec.evaluation.alignment as ex
    from persona4rec.evaluation.candidates import fuse
    from persona4rec.evaluation.metrics import ndcg, ranks_from_scores

    summary = run_experiment(evaluation, config=AdapterConfig(epochs=1, batch_size=16), variants={"adapter": {}},
                             fuse_ease=True)
    ease = summary["EASE"]
    assert "l2" in ease["params"] and "test_NDCG@10" in ease
    for name in ("none", "adapter"):
        fused = summary["results"][name]["fused_with_EASE"]
        assert 0.0 <= fused["alpha"] <= 1.0 and "p_vs_EASE" in fused["test_NDCG@10"]
    assert "p_vs_none_fused" in summary["results"]["adapter"]["fused_with_EASE"]["test_NDCG@10"]
    assert "+ EASE" in format_table(summary)
    # the chosen alpha is the validation argmax (ties: smallest)
    scores, _ = ex.ease_scores(evaluation)
    text = ex.score_phase(evaluation, evaluation.personas, Adapter.identity(evaluation.encoder.dim), "valid")
    alpha, curve = ex.choose_alpha(text, scores["valid"], evaluation.data.valid_targets)
    assert alpha == summary["results"]["none"]["fused_with_EASE"]["alpha"]
    best = max(curve.values())
    assert curve[f"{alpha:.2f}"] == best and all(float(a) >= alpha for a, v in curve.items() if v == best)
    direct = float(ndcg(ranks_from_scores(fuse(text, scores["valid"], alpha), evaluation.data.valid_targets), 10).mean())
    assert direct == pytest.approx(best)


@pytest.mark.slow
def test_pairs_on_real_mi5core_come_only_from_training_interactions():
    import os
    from pathlib import Path

    from persona4rec.evaluation.runner import EvaluationConfig

    root = os.environ.get("PERSONA4REC_SHARED")
    data_dir = Path(root or "") / "data" / "amazon-mi-5core"
    if not root or not (data_dir / "reviews_Musical_Instruments_5.json.gz").is_file():
        pytest.skip("PERSONA4REC_SHARED with data/amazon-mi-5core is not available")
    ev = prepare_evaluation(EvaluationConfig(data_dir=str(data_dir)), _HashEncoder(), cache=False)
    d = ev.data
    targets, histories = training_histories(ev)
    assert len(d.eval_users) == 1429
    # every train review except each user's first is a target; held-out reviews never are
    assert len(targets) == len(d.split.train) - len(np.unique(d.review_user[d.split.train]))
    held_out = set(d.split.valid.tolist()) | set(d.split.test.tolist())
    assert not held_out & set(targets.tolist())
    assert not held_out & set(np.concatenate(histories).tolist())
    pairs = training_pairs(ev, "extractive")
    assert len(pairs) == len(targets)


# ---------------------------------------------------------------- finetune's text view of the same pairs


@pytest.mark.parametrize("kind", ["extractive", "reviews"])
def test_finetune_text_pairs_reproduce_the_profiler_and_labels(evaluation, kind):
    from persona4rec.evaluation.alignment import finetune_data, finetune_pairs

    ev = evaluation
    data = finetune_data(ev, kind)
    pairs = finetune_pairs(ev, data)
    reference = training_pairs(ev, kind)
    assert len(pairs) == len(reference)
    np.testing.assert_array_equal(pairs.positive, reference.positive_ids)
    np.testing.assert_array_equal(pairs.pair_item, reference.item_ids)
    vectors = ev.encoder.encode(data.texts)
    rows = np.repeat(np.arange(len(pairs)), np.diff(pairs.profile_ptr))
    profiles = np.zeros((len(pairs), ev.encoder.dim))
    np.add.at(profiles, rows, pairs.profile_weight[:, None] * vectors[pairs.profile_text])
    profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
    # the text groups and weights are the profiler's own: same profiles as the adapter's pairs
    np.testing.assert_allclose(profiles, reference.users, atol=1e-5)
    if kind == "reviews":  # one review per persona: the text view is exact
        personas = vectors[data.persona_text[data.persona_ptr[:-1]]]
        np.testing.assert_allclose(personas, data.personas.vectors, atol=1e-5)


def test_tower_scorer_with_base_vectors_reproduces_the_harness(evaluation):
    from persona4rec.evaluation.metrics import ndcg
    from persona4rec.evaluation.alignment import TowerScorer, finetune_data

    ev = evaluation
    data = finetune_data(ev, "reviews")

    class BaseTower:  # the untrained encoder seen through the scorer's interface
        def embed(self, ids):
            return ev.encoder.encode([data.texts[i] for i in ids])

    scorer = TowerScorer(ev, data, "reviews")
    personas, _ = persona_set(ev, "reviews")
    identity = Adapter.identity(ev.encoder.dim)
    expected = float(ndcg(rank_phase(ev, personas, identity, "valid"), 10).mean())
    assert scorer(BaseTower()) == pytest.approx(expected, abs=1e-9)
    assert scorer.selection_accuracy() == pytest.approx(
        validation_selection(ev, "reviews").accuracy(identity, personas.vectors, personas.offsets))


def test_finetune_experiment_end_to_end(evaluation, tiny_model, tmp_path):
    """Pairs -> fine-tune (tiny BERT, same dim as the stand-in encoder) -> ONNX export -> the harness
    re-run with the exported encoder -> paired comparison with the base encoder."""
    pytest.importorskip("optimum")
    from persona4rec.encoder import Encoder
    from persona4rec.evaluation.alignment import format_finetune_table, run_finetune_experiment
    from persona4rec.train.finetune import FinetuneConfig

    config = FinetuneConfig(trainable_layers=1, lora_rank=4, epochs=2, batch_size=16, max_length=32, threads=1)
    summary = run_finetune_experiment(evaluation, tiny_model, persona_kind="reviews", config=config, out_dir=tmp_path,
                                      allow_low_int8_agreement=True)  # random weights: int8 agrees poorly
    for kind in ("extractive", "reviews"):
        base, tuned = summary["results"][kind]["none"], summary["results"][kind]["finetune"]
        assert "p_vs_none" in tuned["test_NDCG@10"] and "p_vs_none" not in base["test_NDCG@10"]
        assert 0.0 <= tuned["test_HR@10"]["mean"] <= 1.0
    # the base rows are the harness's own numbers for the stand-in encoder
    personas, _ = persona_set(evaluation, "reviews")
    from persona4rec.evaluation.metrics import ndcg

    base_test = float(ndcg(rank_phase(evaluation, personas, Adapter.identity(32), "test"), 10).mean())
    assert summary["results"]["reviews"]["none"]["test_NDCG@10"]["mean"] == pytest.approx(base_test)
    report = json.loads((tmp_path / "reviews-finetune.report.json").read_text())
    assert report["curve"][0]["step"] == 0
    assert report["best_val_metric"] == max(c["val_metric"] for c in report["curve"])
    encoder = Encoder(summary["onnx_dir"])
    assert encoder.dim == 32 and encoder.fingerprint != evaluation.encoder.fingerprint
    assert "fine-tuned" in format_finetune_table(summary)
    assert (tmp_path / "reviews-finetune-evaluation.md").is_file()
