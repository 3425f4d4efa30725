"""PersonaIndex: build, rerank, search, explain, update, persistence, threads, ANN."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest

from persona4rec import (
    EncoderMismatchError,
    IndexFormatError,
    PersonaIndex,
    UnknownItemError,
)
from persona4rec._core import checksum64
from persona4rec.kernels import score_error_bound


def unit_rows(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_index(n_items=300, d=384, seed=0, max_p=7, ids="str", personas=True, encoder=None):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_p + 1, size=n_items)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    vectors = unit_rows(rng, int(offsets[-1]), d)
    item_ids = [f"B{i:05d}" for i in range(n_items)] if ids == "str" else list(range(1000, 1000 + n_items))
    texts = None
    if personas:
        texts = []
        for i in range(n_items):
            for j in range(sizes[i]):
                texts.append({"Name": f"Persona {j} of {item_ids[i]}", "Description": f"desc {i}/{j}",
                              "Preference_Rationale": f"why {i}/{j}"})
    index = PersonaIndex.build(item_ids, vectors, offsets, personas=texts, encoder=encoder)
    return index, item_ids, vectors, offsets


def float_item_scores(vectors, offsets, user):
    s = vectors @ user
    return np.array([s[offsets[i]:offsets[i + 1]].max() for i in range(len(offsets) - 1)])


# ----------------------------------------------------------------------------- queries
def test_search_agrees_with_float_reference():
    index, ids, vectors, offsets = make_index()
    rng = np.random.default_rng(1)
    users = unit_rows(rng, 20, 384)
    got_ids, got_scores = index.search(users, k=10)
    assert got_ids.shape == (20, 10) and got_scores.shape == (20, 10)
    overlaps = []
    for u in range(20):
        ref = float_item_scores(vectors, offsets, users[u])
        top = np.argsort(-ref, kind="stable")[:10]
        overlaps.append(len(set(got_ids[u]) & {ids[i] for i in top}) / 10)
        # Exact agreement wherever the float gap exceeds the documented int8 error bound.
        bound = 2 * score_error_bound(users[u], vectors).max()
        order = np.argsort(-ref, kind="stable")
        for r in range(9):
            if ref[order[r]] - ref[order[r + 1]] > bound and ref[order[r + 1]] - ref[order[min(r + 2, len(order) - 1)]] > bound:
                assert got_ids[u][r + 1] == ids[order[r + 1]]
    assert np.mean(overlaps) >= 0.9


def test_single_user_shapes_and_exclude_allow():
    index, ids, vectors, offsets = make_index(n_items=50)
    user = unit_rows(np.random.default_rng(2), 1, 384)[0]
    top, scores = index.search(user, k=5)
    assert top.shape == (5,) and scores.dtype == np.float32 and np.all(np.diff(scores) <= 0)
    excluded, _ = index.search(user, k=5, exclude=list(top[:2]) + ["not-an-item"])
    assert not set(top[:2]) & set(excluded) and excluded[0] == top[2]
    allowed, _ = index.search(user, k=10, allow=[ids[3], ids[7], ids[3]])
    assert sorted(allowed) == sorted([ids[3], ids[7]])
    with pytest.raises(UnknownItemError, match="unknown='skip'"):
        index.search(user, k=3, allow=["nope"])
    assert len(index.search(user, k=3, allow=["nope", ids[1]], unknown="skip")[0]) == 1
    everything, _ = index.search(user, k=500)
    assert len(everything) == 50
    batch_ids, batch_scores = index.search(np.stack([user, user]), k=60, exclude=[[], [ids[0]]])
    assert batch_ids.shape == (2, 60) and batch_ids[0, 50] is None and np.isneginf(batch_scores[0, 50])
    assert (batch_ids[1] != None).sum() == 49  # noqa: E711
    ids3, scores3, personas3 = index.search(user, k=3, return_personas=True)
    assert all(p.startswith(i + "_P") for i, p in zip(ids3, personas3))


def test_int_ids_and_padding():
    index, ids, vectors, offsets = make_index(n_items=20, ids="int", personas=False)
    users = unit_rows(np.random.default_rng(3), 2, 384)
    got, _ = index.search(users, k=25)
    assert got.dtype == np.int64 and np.all(got[:, 20:] == -1) and set(got[0, :20]) == set(ids)
    res = index.rerank(users[0], [ids[4], ids[2]])
    assert set(res.ids) == {ids[4], ids[2]} and all(isinstance(x, int) for x in res.ids)
    assert res.persona_ids[0].startswith(f"{res.ids[0]}_P")


def test_rerank_scores_sorting_fusion_and_unknown():
    index, ids, vectors, offsets = make_index(n_items=100)
    rng = np.random.default_rng(4)
    user = unit_rows(rng, 1, 384)[0]
    cand = [ids[i] for i in rng.choice(100, 30, replace=False)]
    res = index.rerank(user, cand)
    assert sorted(res.ids) == sorted(cand) and np.all(np.diff(res.scores) <= 0)
    ref = float_item_scores(vectors, offsets, user)
    for item, score, row in zip(res.ids, res.scores, res.persona_rows):
        i = ids.index(item)
        assert abs(score - ref[i]) < 0.02 and offsets[i] <= row < offsets[i + 1]
    base = rng.standard_normal(30).astype(np.float32)
    fused = index.rerank(user, cand, base_scores=base, alpha=0.3)
    pos = {c: j for j, c in enumerate(cand)}
    norm = (base - base.min()) / (base.max() - base.min())
    for item, score, ps in zip(fused.ids, fused.scores, fused.persona_scores):
        assert score == pytest.approx(0.3 * ps + 0.7 * norm[pos[item]], abs=1e-6)
    only_base = index.rerank(user, cand, base_scores=base, alpha=0.0)
    assert only_base.ids == [cand[j] for j in np.argsort(-base, kind="stable")]
    with pytest.raises(UnknownItemError, match="1 candidate ids not in the index"):
        index.rerank(user, cand + ["missing"])
    skipped = index.rerank(user, cand + ["missing"], base_scores=np.append(base, 9.0), alpha=0.5, unknown="skip")
    assert "missing" not in skipped.ids and len(skipped) == 30
    with pytest.raises(ValueError, match="one score per candidate"):
        index.rerank(user, cand, base_scores=base[:-1])
    with pytest.raises(ValueError, match="alpha"):
        index.rerank(user, cand, base_scores=base, alpha=1.5)
    with pytest.raises(ValueError, match="NaN"):
        index.rerank(user, cand, base_scores=np.full(30, np.nan))
    assert len(index.rerank(user, [])) == 0


def test_explain_lists_every_persona_best_first():
    index, ids, vectors, offsets = make_index(n_items=10)
    user = vectors[offsets[3] + 0].copy()  # the user *is* persona 0 of item 3
    matches = index.explain(user, ids[3])
    assert len(matches) == offsets[4] - offsets[3]
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    assert matches[0].persona_id == f"{ids[3]}_P1" and matches[0].name == f"Persona 0 of {ids[3]}"
    assert matches[0].rationale == "why 3/0" and matches[0].score == pytest.approx(1.0, abs=0.01)
    res = index.rerank(user, [ids[3]])
    assert res.persona_ids == [matches[0].persona_id] and res.scores[0] == pytest.approx(matches[0].score)
    with pytest.raises(UnknownItemError):
        index.explain(user, "nope")


def test_bad_input_messages():
    index, ids, vectors, offsets = make_index(n_items=5, d=16)
    with pytest.raises(EncoderMismatchError, match="dimension 8 does not match"):
        index.search(np.ones(8, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(16, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        index.search(np.ones(16, dtype=np.int64))
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones(16, dtype=np.float32), k=-1)
    with pytest.raises(ValueError, match="offsets must have"):
        PersonaIndex.build(["a", "b"], vectors[:3], [0, 3])
    with pytest.raises(ValueError, match="never decrease"):
        PersonaIndex.build(["a", "b"], vectors[:3], [0, 2, 1])
    with pytest.raises(ValueError, match="float32"):
        PersonaIndex.build(["a"], vectors[:2].astype(np.float64), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        PersonaIndex.build(["a"], np.full((2, 16), np.nan, dtype=np.float32), [0, 2])
    with pytest.raises(ValueError, match="unique"):
        PersonaIndex.build(["a", "a"], vectors[:2], [0, 1, 2])
    with pytest.raises(TypeError, match="all str or all int"):
        PersonaIndex.build(["a", 1], vectors[:2], [0, 1, 2])
    with pytest.raises(ValueError, match="one entry per vector"):
        PersonaIndex.build(["a"], vectors[:2], [0, 2], personas=[{"Name": "x"}])
    normalised = PersonaIndex.build(["a"], vectors[:2] * 3, [0, 2], normalize=True)
    assert normalised.rerank(vectors[0], ["a"]).scores[0] == pytest.approx(1.0, abs=0.01)


def test_encoder_identity_mismatch_is_caught():
    identity = {"model": "all-MiniLM-L6-v2", "dim": 384, "pooling": "mean", "fingerprint": "abc"}
    index, ids, vectors, _ = make_index(n_items=5, encoder=identity)
    user = vectors[0]
    assert index.encoder_identity == identity
    index.rerank(user, [ids[0]], encoder=identity)
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        index.rerank(user, [ids[0]], encoder=dict(identity, fingerprint="zzz"))

    class FakeEncoder:
        def __init__(self, identity):
            self.identity = identity

    with pytest.raises(EncoderMismatchError, match="pooling"):
        index.search(user, encoder=FakeEncoder(dict(identity, pooling="cls")))


# ----------------------------------------------------------------------------- updates
def test_add_remove_compact_match_a_fresh_build():
    index, ids, vectors, offsets = make_index(n_items=60, d=32)
    rng = np.random.default_rng(9)
    users = unit_rows(rng, 5, 32)
    new_vectors = unit_rows(rng, 6, 32)
    index.add_items(["N1", "N2"], new_vectors, [0, 4, 6], personas=[{"Name": f"n{i}"} for i in range(6)])
    removed = [ids[0], ids[5], "N1"]
    assert index.remove_items(removed) == 3
    assert index.n_items == 59 and ids[0] not in index and "N2" in index

    keep = [i for i in range(60) if ids[i] not in removed]
    fresh_ids = [ids[i] for i in keep] + ["N2"]
    fresh_vecs = np.concatenate([vectors[offsets[i]:offsets[i + 1]] for i in keep] + [new_vectors[4:6]])
    fresh_off = np.concatenate([[0], np.cumsum([offsets[i + 1] - offsets[i] for i in keep] + [2])])
    fresh = PersonaIndex.build(fresh_ids, fresh_vecs, fresh_off)

    def same(a, b):
        ia, sa = a.search(users, k=15)
        ib, sb = b.search(users, k=15)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)

    same(index, fresh)
    with pytest.raises(UnknownItemError):
        index.rerank(users[0], [ids[0]])
    index.compact()
    assert index.n_personas == fresh.n_personas
    same(index, fresh)
    assert index.explain(users[0], "N2")[0].name in {"n4", "n5"}
    # A removed id can be added again.
    index.add_items([ids[0]], vectors[:1], [0, 1])
    assert ids[0] in index
    with pytest.raises(ValueError, match="already in the index"):
        index.add_items([ids[0]], vectors[:1], [0, 1])
    with pytest.raises(ValueError, match="dimension"):
        index.add_items(["X"], unit_rows(rng, 1, 8), [0, 1])


def test_queries_during_mutation_see_a_consistent_snapshot():
    index, ids, vectors, offsets = make_index(n_items=200, d=32, personas=False)
    user = unit_rows(np.random.default_rng(0), 1, 32)[0]
    before = index.search(user, k=10)
    errors = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            got_ids, _ = index.search(user, k=10)
            if len(got_ids) != 10:
                errors.append(got_ids)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for j in range(20):
        index.add_items([f"X{j}"], unit_rows(np.random.default_rng(j), 2, 32), [0, 2])
        index.remove_items([f"X{j}"])
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    np.testing.assert_array_equal(index.search(user, k=10)[0], before[0])


def test_eight_threads_get_serial_results():
    index, ids, vectors, offsets = make_index(n_items=2000, d=64, personas=False)
    rng = np.random.default_rng(5)
    users = unit_rows(rng, 64, 64)
    cands = [[ids[i] for i in rng.choice(2000, 50, replace=False)] for _ in range(64)]
    serial = [(index.search(users[i], k=10), index.rerank(users[i], cands[i])) for i in range(64)]
    results = [None] * 64

    def work(t):
        for i in range(t, 64, 8):
            results[i] = (index.search(users[i], k=10), index.rerank(users[i], cands[i]))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for (s_search, s_rerank), (p_search, p_rerank) in zip(serial, results):
        np.testing.assert_array_equal(s_search[0], p_search[0])
        np.testing.assert_array_equal(s_search[1], p_search[1])
        assert s_rerank.ids == p_rerank.ids
        np.testing.assert_array_equal(s_rerank.scores, p_rerank.scores)


def test_batch_threads_match_single_thread():
    index, *_ = make_index(n_items=500, d=48, personas=False)
    users = unit_rows(np.random.default_rng(6), 9, 48)
    a = index.search(users, k=7)
    b = index.search(users, k=7, n_threads=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ------------------------------------------------------------------------- persistence
def small_saved(tmp_path, **kw):
    index, ids, vectors, offsets = make_index(n_items=6, d=5, max_p=3, **kw)
    path = tmp_path / "small.p4r"
    index.save(path)
    return index, path, vectors


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_is_bit_exact(tmp_path, mmap):
    identity = {"model": "m", "dim": 384, "pooling": "mean", "fingerprint": "f"}
    index, ids, vectors, offsets = make_index(n_items=40, encoder=identity)
    index.remove_items([ids[1]])
    path = tmp_path / "index.p4r"
    index.save(path)
    loaded = PersonaIndex.load(path, mmap=mmap)
    a, b = index._snap, loaded._snap
    for name in ("codes", "scales", "offsets"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    if mmap:
        assert not b.codes.flags.writeable  # mapped read-only, not copied
    assert loaded.encoder_identity == identity and loaded.n_items == 39 and ids[1] not in loaded
    users = unit_rows(np.random.default_rng(7), 4, 384)
    np.testing.assert_array_equal(index.search(users, k=10)[0], loaded.search(users, k=10)[0])
    assert index.explain(users[0], ids[2]) == loaded.explain(users[0], ids[2])
    # Saving the loaded index reproduces the file byte for byte.
    path2 = tmp_path / "again.p4r"
    loaded.save(path2)
    assert path.read_bytes() == path2.read_bytes()


def test_every_truncation_raises_a_clear_error(tmp_path):
    _, path, _ = small_saved(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "cut.p4r"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        with pytest.raises(IndexFormatError, match="truncated|empty"):
            PersonaIndex.load(bad, mmap=n % 2 == 0)


def test_random_bit_flips_are_detected(tmp_path):
    _, path, _ = small_saved(tmp_path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    bad = tmp_path / "flip.p4r"
    positions = list(range(0, 64)) + list(rng.integers(0, len(data), size=400))
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(flipped))
        with pytest.raises(IndexFormatError):
            PersonaIndex.load(bad)


def test_version_and_magic_errors(tmp_path):
    _, path, _ = small_saved(tmp_path)
    data = bytearray(path.read_bytes())
    newer = bytearray(data)
    struct.pack_into("<I", newer, 8, 99)
    struct.pack_into("<Q", newer, 56, checksum64(bytes(newer[:56])))
    (tmp_path / "v99.p4r").write_bytes(bytes(newer))
    with pytest.raises(IndexFormatError, match="format version 99 is newer.*upgrade persona4rec"):
        PersonaIndex.load(tmp_path / "v99.p4r")
    (tmp_path / "junk.p4r").write_bytes(b"hello world" * 10)
    with pytest.raises(IndexFormatError, match="not a persona4rec index"):
        PersonaIndex.load(tmp_path / "junk.p4r")
    with pytest.raises(FileNotFoundError):
        PersonaIndex.load(tmp_path / "absent.p4r")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    index, path, _ = small_saved(tmp_path)
    original = path.read_bytes()
    import persona4rec._persist as persist

    def exploding_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(persist, "_span_checksum", exploding_write)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.p4r"]


# ---------------------------------------------------------------------------- ANN
def clustered(rng, n, d, n_clusters, latent=16, spread=0.5, noise=0.05):
    """Unit vectors in clusters on a low-dimensional subspace, plus a little noise.

    Sentence embeddings have a low intrinsic dimension, which is what graph search relies
    on; i.i.d. Gaussian vectors (intrinsic dimension d) are the worst case, reported
    separately in the README rather than asserted here.
    """
    basis = np.linalg.qr(np.random.default_rng(123).standard_normal((d, latent)))[0].astype(np.float32)
    centres = np.random.default_rng(321).standard_normal((n_clusters, latent)).astype(np.float32)
    z = centres[rng.integers(0, n_clusters, size=n)] + spread * rng.standard_normal((n, latent)).astype(np.float32)
    v = z @ basis.T + noise * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_ann_recall_on_100k_clustered_personas():
    pytest.importorskip("hnswlib", reason="approximate search needs the [ann] extra")
    rng = np.random.default_rng(0)
    n_items, P, d = 20_000, 5, 64
    vectors = clustered(rng, n_items * P, d, 200)
    index = PersonaIndex.build(list(range(n_items)), vectors, np.arange(0, n_items * P + 1, P))
    index.build_ann()  # default parameters
    users = clustered(np.random.default_rng(1), 200, d, 200)
    recall = index.recall_at_k(users, k=10)
    assert recall >= 0.95, recall


def test_ann_results_are_exactly_rescored_and_persisted(tmp_path):
    pytest.importorskip("hnswlib", reason="approximate search needs the [ann] extra")
    rng = np.random.default_rng(2)
    vectors = clustered(rng, 3000, 32, 30)
    ids = [f"i{j}" for j in range(1000)]
    index = PersonaIndex.build(ids, vectors, np.arange(0, 3001, 3))
    index.build_ann(M=12, ef_construction=100)
    users = clustered(np.random.default_rng(3), 5, 32, 30)
    approx_ids, approx_scores = index.search_approx(users, k=10)
    for u in range(5):
        res = index.rerank(users[u], list(approx_ids[u]))
        np.testing.assert_array_equal(res.scores, approx_scores[u])  # exact int8 re-scoring
    excl, _ = index.search_approx(users[0], k=10, exclude=list(approx_ids[0][:3]))
    assert not set(excl) & set(approx_ids[0][:3])
    index.remove_items([approx_ids[1][0]])
    assert approx_ids[1][0] not in set(index.search_approx(users[1], k=10)[0])
    index.add_items(["new"], users[2][None, :], [0, 1])
    assert index.search_approx(users[2], k=1)[0][0] == "new"

    path = tmp_path / "ann.p4r"
    index.save(path)
    loaded = PersonaIndex.load(path)
    np.testing.assert_array_equal(loaded.search_approx(users, k=10)[0], index.search_approx(users, k=10)[0])
    # One file: the graph is a section of the index, not a file beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.p4r"]
    data = path.read_bytes()
    graph_section = next(e for e in _sections(path) if e["name"] == "ann.data_level0")
    flipped = bytearray(data)
    flipped[graph_section["offset"] + graph_section["nbytes"] // 2] ^= 4
    path.write_bytes(bytes(flipped))
    with pytest.raises(IndexFormatError, match="ann.data_level0.*corrupted"):
        PersonaIndex.load(path)


def _sections(path):
    import json

    data = path.read_bytes()
    json_off, json_len = struct.unpack_from("<QQ", data, 16)
    return json.loads(data[json_off:json_off + json_len])["sections"]


def test_search_approx_without_graph_says_what_to_do():
    index, *_ = make_index(n_items=5, d=8)
    with pytest.raises(RuntimeError, match="build_ann"):
        index.search_approx(np.ones(8, dtype=np.float32))


def test_int_id_lookup_table_and_fallback():
    index, ids, vectors, offsets = make_index(n_items=30, d=16, ids="int", personas=False)
    user = vectors[offsets[7]].copy()
    as_array = index.rerank(user, np.array([ids[3], ids[7], 5], dtype=np.int64), unknown="skip")
    assert as_array.ids[0] == ids[7] and len(as_array) == 2
    with pytest.raises(UnknownItemError):
        index.rerank(user, np.array([ids[3], 10**9]))
    index.add_items([ids[-1] + 1, 10**12], vectors[:2], [0, 1, 2])  # in range, then far outside it
    assert index.rerank(user, [ids[-1] + 1, 10**12]).ids[0] in {ids[-1] + 1, 10**12}
    assert set(index.rerank(user, np.array([10**12, ids[0]])).ids) == {10**12, ids[0]}
    index.remove_items([ids[7]])
    assert index.rerank(user, [ids[7], ids[1]], unknown="skip").ids == [ids[1]]


def test_native_rerank_by_id_matches_the_python_path():
    # String ids take the one-call native path when there are no base scores; with base
    # scores and alpha=1 the Python path computes the same ranking.
    index, ids, vectors, offsets = make_index(n_items=80, d=24, personas=False)
    rng = np.random.default_rng(12)
    index.add_items(["dup"], vectors[offsets[5]:offsets[6]].copy(), [0, offsets[6] - offsets[5]])  # ties item 5
    index.remove_items([ids[9]])
    user = unit_rows(rng, 1, 24)[0]
    cand = [ids[i] for i in rng.choice(80, 40, replace=False)] + ["dup", ids[5]]
    cand = [c for c in cand if c != ids[9]]
    fast = index.rerank(user, cand)
    slow = index.rerank(user, cand, base_scores=np.zeros(len(cand)), alpha=1.0)
    assert fast.ids == slow.ids
    np.testing.assert_array_equal(fast.scores, slow.scores)
    np.testing.assert_array_equal(fast.persona_rows, slow.persona_rows)
    assert fast.ids.index("dup") < fast.ids.index(ids[5]) or cand.index(ids[5]) < cand.index("dup")
    with pytest.raises(UnknownItemError, match=repr(ids[9])):
        index.rerank(user, cand + [ids[9]])
    assert index.rerank(user, cand + [ids[9], "nope"], unknown="skip").ids == fast.ids
    with pytest.raises(TypeError):
        index.rerank(user, [["unhashable"]])


def test_recall_against_the_float_exact_answer():
    pytest.importorskip("hnswlib", reason="approximate search needs the [ann] extra")
    rng = np.random.default_rng(4)
    vectors = clustered(rng, 3000, 32, 30)
    ids = [f"i{j}" for j in range(1000)]
    index = PersonaIndex.build(ids, vectors, np.arange(0, 3001, 3))
    index.build_ann(M=12, ef_construction=100)
    users = clustered(np.random.default_rng(5), 20, 32, 30)
    r_int8 = index.recall_at_k(users, 10)
    r_float = index.recall_at_k(users, 10, reference_vectors=vectors)
    assert 0.8 <= r_float <= 1.0 and 0.8 <= r_int8 <= 1.0
    # With a huge ef the graph is exact, so what is left against float truth is int8 scoring.
    exact_graph = index.recall_at_k(users, 10, ef=3000, overfetch=300, reference_vectors=vectors)
    float_truth = [set(np.asarray(ids)[np.argsort(-np.maximum.reduceat(vectors @ u, np.arange(0, 3000, 3)),
                                                  kind="stable")[:10]]) for u in users]
    int8_top = index.search(users, 10)[0]
    agreement = np.mean([len(t & set(a)) / 10 for t, a in zip(float_truth, int8_top)])
    assert exact_graph == pytest.approx(agreement)
    with pytest.raises(ValueError, match="one float row per persona"):
        index.recall_at_k(users, 10, reference_vectors=vectors[:10])
