"""Recommender: profiler + index + optional first stage, one typed result, save/load without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from persona4rec import EmptyHistoryError, PersonaIndex, Recommendation, Recommender, UserProfiler
from persona4rec.evaluation.baselines import BPR, EASE, CFRetriever, ItemKNN, Popularity, interaction_matrix
from persona4rec.profile import Interaction
from test_eval_pipeline import HashEncoder

WORDS = ["bright", "warm", "cheap", "sturdy", "loud", "quiet", "smooth", "heavy", "light", "crisp", "strap", "pick"]


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(0)
    encoder = HashEncoder()
    n_items = 30
    item_ids = [f"I{i}" for i in range(n_items)]
    counts = rng.integers(1, 4, size=n_items)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    texts = [" ".join(rng.choice(WORDS, size=5)) for _ in range(offsets[-1])]
    vectors = encoder.encode(texts)
    records = [{"persona_id": f"{item_ids[i]}_P{j + 1}", "name": f"name {i}.{j}", "description": texts[offsets[i] + j],
                "rationale": f"because {i}.{j}"} for i in range(n_items) for j in range(counts[i])]
    index = PersonaIndex.build(item_ids, vectors, offsets, personas=records)
    users = np.repeat(np.arange(40), 5)
    items = rng.integers(0, n_items, size=len(users))
    train = interaction_matrix(users, items, 40, n_items)
    return encoder, index, item_ids, train


def history(rng_seed: int, item_ids: list[str], n: int = 4) -> list[Interaction]:
    rng = np.random.default_rng(rng_seed)
    picks = rng.choice(len(item_ids), size=n, replace=False)
    return [Interaction(" ".join(rng.choice(WORDS, size=6)), 5.0, float(t), item_ids[p]) for t, p in enumerate(picks)]


def profiler(encoder) -> UserProfiler:
    return UserProfiler(encoder, cache=False, template="amazon-5core")


def test_persona_only_matches_the_index_search_and_explains_each_item(parts) -> None:
    encoder, index, item_ids, _ = parts
    rec = Recommender(profiler(encoder), index)
    h = history(1, item_ids)
    out = rec.recommend(h, k=5)
    assert isinstance(out, Recommendation) and len(out) == 5 and out.source == "personas"
    vector = profiler(encoder).profile(h)
    ids, scores, personas = index.search(vector, k=5, exclude=[x.item_id for x in h], return_personas=True)
    assert out.item_ids == list(ids) and np.allclose(out.scores, scores) and out.persona_ids == list(personas)
    assert not set(out.item_ids) & {x.item_id for x in h}
    for item, pid, name, why in zip(out.item_ids, out.persona_ids, out.persona_names, out.rationales):
        persona_number = int(pid.rsplit("_P", 1)[1])
        assert pid.startswith(item + "_P") and name == f"name {item[1:]}.{persona_number - 1}"
        assert why.startswith("because ")
    kept = rec.recommend(h, k=40, exclude_seen=False)
    assert set(x.item_id for x in h) <= set(kept.item_ids)
    assert out.to_records()[0]["persona_name"] == out.persona_names[0]


def test_fused_first_stage_matches_a_manual_rerank(parts) -> None:
    encoder, index, item_ids, train = parts
    retriever = CFRetriever(EASE(l2=10.0).fit(train), item_ids)
    rec = Recommender(profiler(encoder), index, retriever=retriever, alpha=0.4, rerank_depth=12)
    h = history(2, item_ids)
    out = rec.recommend(h, k=6)
    cand, base = retriever.recommend([x.item_id for x in h], k=12)
    manual = index.rerank(profiler(encoder).profile(h), cand, base_scores=base, alpha=0.4)
    assert out.source == "fused" and out.item_ids == manual.ids[:6]
    assert np.allclose(out.scores, manual.scores[:6]) and out.persona_ids == manual.persona_ids[:6]
    batch = rec.recommend_batch([history(s, item_ids) for s in range(2, 6)], k=6)
    assert batch[0].item_ids == out.item_ids and len(batch) == 4


def test_empty_history_falls_back_to_the_first_stage_or_says_what_to_do(parts) -> None:
    encoder, index, item_ids, train = parts
    with pytest.raises(EmptyHistoryError, match="retriever"):
        Recommender(profiler(encoder), index).recommend([])
    rec = Recommender(profiler(encoder), index, retriever=CFRetriever(Popularity().fit(train), item_ids))
    out = rec.recommend([], k=3)
    assert out.source == "retriever" and len(out) == 3 and out.persona_ids == ["", "", ""]
    # Every interaction rated below min_rating: profiled from all of them, as the harness does.
    low = [Interaction(x.text, 1.0, x.timestamp, x.item_id) for x in history(3, item_ids)]
    assert rec.recommend(low, k=3).source == "fused"


@pytest.mark.parametrize("make", [Popularity, lambda: ItemKNN(shrink=5.0, neighbors=10), lambda: EASE(l2=5.0),
                                  lambda: BPR(factors=8, epochs=20, seed=1)])
def test_cf_models_recommend_like_their_score_matrix(parts, make) -> None:
    _, _, _, train = parts
    model = make().fit(train)
    user = 7
    seen = train[user].indices
    top, scores = model.recommend(seen, k=5)
    assert not set(top.tolist()) & set(seen.tolist()) and len(top) == 5
    assert np.all(np.diff(scores) <= 0)
    if not isinstance(model, BPR):  # BPR folds a new user in from the mean user, not the trained row
        full = model.score(train, np.array([user]))[0].astype(np.float64)
        full[seen] = -np.inf
        assert np.allclose(scores, np.sort(full)[::-1][:5])
    with pytest.raises(ValueError, match="position outside"):
        model.recommend([train.shape[1]])
    row = sp.csr_matrix(train[user])
    assert model.recommend(row, k=5)[0].tolist() == top.tolist()


def test_save_and_load_round_trip_without_pickle(parts, tmp_path) -> None:
    encoder, index, item_ids, train = parts
    bpr = BPR(factors=8, epochs=20, seed=1).fit(train)
    for retriever in (None, CFRetriever(bpr, item_ids), CFRetriever(ItemKNN(shrink=5.0).fit(train), item_ids)):
        rec = Recommender(profiler(encoder), index, retriever=retriever, alpha=0.3, rerank_depth=10)
        folder = rec.save(tmp_path / f"rec-{type(getattr(retriever, 'model', None)).__name__}")
        settings = json.loads((folder / "recommender.json").read_text())
        assert settings["alpha"] == 0.3 and settings["profiler"]["template"] == "amazon-5core"
        for npz in folder.glob("*.npz"):
            np.load(npz, allow_pickle=False)  # plain arrays only
        again = Recommender.load(folder, encoder, cache=False)
        for seed in (4, 5):
            h = history(seed, item_ids)
            a, b = rec.recommend(h, k=5), again.recommend(h, k=5)
            assert a.item_ids == b.item_ids and np.allclose(a.scores, b.scores)
            assert a.persona_names == b.persona_names


def test_load_refuses_foreign_classes_and_bad_settings(parts, tmp_path) -> None:
    encoder, index, item_ids, _ = parts
    folder = Recommender(profiler(encoder), index).save(tmp_path / "r")
    settings = json.loads((folder / "recommender.json").read_text())
    settings["index"]["class"] = "os.system"
    (folder / "recommender.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="not a persona4rec class"):
        Recommender.load(folder, encoder)
    (folder / "recommender.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Recommender.load(folder, encoder)
    with pytest.raises(FileNotFoundError, match="Recommender.save"):
        Recommender.load(tmp_path / "missing", encoder)
    with pytest.raises(ValueError, match="alpha"):
        Recommender(profiler(encoder), index, alpha=1.5)
    with pytest.raises(TypeError, match="search"):
        Recommender(profiler(encoder), object())


def test_the_sharded_index_plugs_in_and_saves_with_the_recommender(parts, tmp_path) -> None:
    sharded = pytest.importorskip("persona4rec.sharded")
    encoder, index, item_ids, train = parts
    rng = np.random.default_rng(0)  # the fixture's persona texts and vectors, rebuilt into 3 shards
    counts = rng.integers(1, 4, size=len(item_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    texts = [" ".join(rng.choice(WORDS, size=5)) for _ in range(offsets[-1])]
    records = [{"persona_id": f"{item_ids[i]}_P{j + 1}", "name": f"name {i}.{j}", "description": texts[offsets[i] + j],
                "rationale": f"because {i}.{j}"} for i in range(len(item_ids)) for j in range(counts[i])]
    shards = sharded.ShardedPersonaIndex.build(item_ids, encoder.encode(texts), offsets, personas=records, n_shards=3)
    retriever = CFRetriever(EASE(l2=10.0).fit(train), item_ids)
    for stage in (None, retriever):
        one = Recommender(profiler(encoder), index, retriever=stage, alpha=0.5, rerank_depth=15)
        many = Recommender(profiler(encoder), shards, retriever=stage, alpha=0.5, rerank_depth=15)
        for seed in (6, 7):
            a, b = one.recommend(history(seed, item_ids), k=8), many.recommend(history(seed, item_ids), k=8)
            assert a.item_ids == b.item_ids and a.persona_ids == b.persona_ids and a.rationales == b.rationales
            assert np.allclose(a.scores, b.scores)
    folder = Recommender(profiler(encoder), shards, retriever=retriever, alpha=0.5, rerank_depth=15).save(tmp_path / "s")
    again = Recommender.load(folder, encoder, cache=False)
    assert type(again.index).__name__ == "ShardedPersonaIndex"
    h = history(6, item_ids)
    assert again.recommend(h, k=8).item_ids == many.recommend(h, k=8).item_ids
