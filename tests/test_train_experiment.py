"""The alignment experiment's data plumbing: leakage-free pairs, personas, ranking, end to end."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from persona4rec.train import Adapter, AdapterConfig
from persona4rec.train.experiment import (
    AlignmentData,
    build_personas,
    format_table,
    heldout_selection,
    prepare_data,
    rank_targets,
    run_experiment,
    training_pairs,
    user_profiles,
)


def _toy(seed=0, n_users=6, n_items=5, per_user=5, d=8):
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(n_users), per_user)
    item = np.concatenate([rng.permutation(n_items)[:per_user] for _ in range(n_users)])
    ts = np.tile(np.arange(per_user, dtype=float), n_users)
    ts[1] = ts[2]  # user 0: two reviews on the same day
    vecs = rng.standard_normal((len(user), d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    last = np.arange(n_users) * per_user + per_user - 1
    data = AlignmentData(
        user=user, item=item, timestamp=ts, review_vecs=vecs,
        title_vecs=np.eye(n_items, d, dtype=np.float32), train=np.setdiff1d(np.arange(len(user)), np.r_[last, last - 1]),
        valid=last - 1, test=last, n_users=n_users, n_items=n_items, split_desc="toy",
    )
    return data


def test_personas_come_from_training_reviews_only():
    data = _toy()
    bank = build_personas(data, "reviews")
    assert set(bank.source_review[bank.source_review >= 0]) <= set(data.train)
    assert len(bank.item_ptr) == data.n_items + 1 and np.all(np.diff(bank.item_ptr) >= 1)
    for it in range(data.n_items):
        rows = bank.source_review[bank.item_ptr[it]:bank.item_ptr[it + 1]]
        train_rows = data.train[data.item[data.train] == it]
        if len(train_rows):
            assert sorted(rows) == sorted(train_rows)
        else:  # no training review: the title stands in
            assert list(rows) == [-1]
    mean = build_personas(data, "mean")
    assert len(mean.vectors) == data.n_items


def test_training_pairs_use_strictly_earlier_history_and_exclude_own_review():
    data = _toy()
    bank = build_personas(data, "reviews")
    pairs = training_pairs(data, bank)
    train = set(data.train.tolist())
    for k in range(len(pairs)):
        u, it = pairs.user_ids[k], pairs.item_ids[k]
        row = next(r for r in train if data.user[r] == u and data.item[r] == it)
        hist = [r for r in train if data.user[r] == u and data.timestamp[r] < data.timestamp[row]]
        assert hist, "pairs need a non-empty history"
        expect = data.review_vecs[hist].sum(0)
        np.testing.assert_allclose(pairs.users[k], expect / np.linalg.norm(expect), rtol=1e-5, atol=1e-6)
        # the positive is not the user's own review of the item
        assert bank.source_review[pairs.positive_ids[k]] != row
        assert bank.item_ptr[it] <= pairs.positive_ids[k] < bank.item_ptr[it + 1]
    # first review of each user and same-day ties with it produce no pair
    assert len(pairs) <= len(data.train) - data.n_users


def test_rank_targets_excludes_history_and_identity_matches_brute_force():
    data = _toy()
    bank = build_personas(data, "reviews")
    hist = np.concatenate([data.train, data.valid])
    ranks = rank_targets(data, bank, Adapter.identity(data.dim), data.test, hist)
    prof = user_profiles(data, hist)
    for k, row in enumerate(data.test):
        u = data.user[row]
        seen = set(data.item[hist][data.user[hist] == u])
        scores = {}
        for it in range(data.n_items):
            if it in seen:
                continue
            scores[it] = max(bank.vectors[bank.item_ptr[it]:bank.item_ptr[it + 1]] @ prof[u])
        target = data.item[row]
        better = sum(1 for it, s in scores.items() if s > scores[target] + 1e-6)
        assert ranks[k] == better + 1


def test_heldout_selection_accuracy_of_a_perfect_profile_is_one():
    data = _toy()
    bank = build_personas(data, "reviews")
    sel = heldout_selection(data, bank, data.test, data.train)
    perfect = type(sel)(bank.vectors[sel.positive], sel.items, sel.positive)
    assert perfect.accuracy(Adapter.identity(data.dim), bank) == 1.0
    acc = sel.accuracy(Adapter.identity(data.dim), bank)
    assert 0.0 <= acc <= 1.0


class _HashEncoder:
    """A deterministic bag-of-words stand-in for the ONNX encoder (no model files needed)."""

    dim = 32
    identity = {"name": "hash-bow-test", "dim": 32}

    def encode(self, texts):
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


def test_end_to_end_on_a_small_dataset(tmp_path):
    data_dir = tmp_path / "amazon-mi-5core"
    data_dir.mkdir()
    _write_dataset(data_dir)
    data = prepare_data(data_dir=data_dir, encoder=_HashEncoder(), cache_dir=tmp_path / "cache")
    assert data.n_users == 30 and data.dim == 32 and len(data.test) == 30
    again = prepare_data(data_dir=data_dir, encoder=_HashEncoder(), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.review_vecs, data.review_vecs)
    assert len(list((tmp_path / "cache").glob("emb-*.npy"))) == 2  # reviews and titles, reused
    cfg = AdapterConfig(epochs=3, batch_size=16, lr=1e-2)
    out = tmp_path / "run"
    summary = run_experiment(data, config=cfg, variants={"adapter": {}}, out_dir=out, n_boot=200)
    assert set(summary["results"]) == {"none", "adapter"}
    none, trained = summary["results"]["none"], summary["results"]["adapter"]
    assert "p_vs_none" in trained["test_NDCG@10"] and "p_vs_none" not in none["test_NDCG@10"]
    lo, hi = none["test_NDCG@10"]["ci95"]
    assert lo <= none["test_NDCG@10"]["mean"] <= hi
    # early stopping on validation NDCG: the kept adapter is never worse there than no training
    assert trained["val_NDCG@10"] >= none["val_NDCG@10"] - 1e-12
    assert (out / "adapter.npz").is_file() and (out / "adapter.report.json").is_file()
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk["data"]["train_pairs"] == summary["data"]["train_pairs"] > 0
    assert "| adapter |" in format_table(summary)
    loaded = Adapter.load(out / "adapter.npz")
    assert loaded.dim == 32


def test_cli_is_registered_and_parses():
    from persona4rec.cli import build_parser

    try:
        parser = build_parser()
        args = parser.parse_args(["train-adapter", "--out", "x", "--variants", "adapter", "--rank", "16"])
    except SystemExit:  # pragma: no cover
        pytest.fail("train-adapter did not parse")
    assert args.rank == 16 and args.personas == "reviews" and args.tie_break == "random"
