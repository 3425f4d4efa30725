"""Grouped max-sim (rerank and fused top-k) against a numpy reference, on every SIMD path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona4rec import kernels
from persona4rec.kernels import MaxSimIndex, lists_to_csr, quantize, simd_info

AVAILABLE = simd_info()["available"]
DIMS = [1, 3, 15, 16, 17, 63, 64, 65, 383, 384, 385, 1024, 4096]


@pytest.fixture(params=AVAILABLE)
def simd_path(request):
    with kernels.forced_simd(request.param):
        yield request.param


def make_catalog(rng, n_items: int, d: int, max_personas: int = 16, min_personas: int = 0):
    sizes = rng.integers(min_personas, max_personas + 1, size=n_items)
    offsets = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    vectors = rng.standard_normal((int(offsets[-1]), d)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    codes, scales = quantize(vectors)
    return vectors, codes, scales, offsets


def reference_item_scores(codes, scales, offsets, query):
    """Per-item best persona with the core's exact float formula (and first-max ties)."""
    q_codes, q_scales = quantize(query[None, :].astype(np.float32))
    dots = codes.astype(np.int64) @ q_codes[0].astype(np.int64)
    persona_scores = (dots.astype(np.float32) * q_scales[0]) * scales
    n_items = len(offsets) - 1
    best = np.full(n_items, -np.inf, dtype=np.float32)
    best_row = np.full(n_items, -1, dtype=np.int64)
    for i in range(n_items):
        a, b = offsets[i], offsets[i + 1]
        if b > a:
            j = int(np.argmax(persona_scores[a:b]))
            best[i] = persona_scores[a + j]
            best_row[i] = a + j
    return best, best_row


def reference_topk(best, best_row, k, eligible):
    items = np.flatnonzero(eligible & (best_row >= 0))
    order = np.lexsort((items, -best[items]))  # score desc, then index asc
    top = items[order][:k]
    out_items = np.full(k, -1, dtype=np.int64)
    out_scores = np.full(k, -np.inf, dtype=np.float32)
    out_rows = np.full(k, -1, dtype=np.int64)
    out_items[: len(top)] = top
    out_scores[: len(top)] = best[top]
    out_rows[: len(top)] = best_row[top]
    return out_items, out_scores, out_rows


@pytest.mark.parametrize("d", DIMS)
def test_rerank_and_topk_match_reference(simd_path, d):
    rng = np.random.default_rng(d)
    n_items = 60 if d < 1024 else 25
    _, codes, scales, offsets = make_catalog(rng, n_items, d)
    index = MaxSimIndex(codes, scales, offsets)
    query = rng.standard_normal(d).astype(np.float32)
    best, best_row = reference_item_scores(codes, scales, offsets, query)

    candidates = rng.permutation(n_items)[:17].astype(np.int64)
    scores, rows = index.score_candidates(query, candidates)
    np.testing.assert_array_equal(scores, best[candidates])
    np.testing.assert_array_equal(rows, best_row[candidates])

    for k in (1, 5, n_items, n_items + 7):
        items, top_scores, top_rows = index.topk(query[None, :], k)
        ref = reference_topk(best, best_row, k, np.ones(n_items, dtype=bool))
        np.testing.assert_array_equal(items[0], ref[0])
        np.testing.assert_array_equal(top_scores[0], ref[1])
        np.testing.assert_array_equal(top_rows[0], ref[2])


def test_items_without_personas_are_never_returned(simd_path):
    rng = np.random.default_rng(7)
    _, codes, scales, offsets = make_catalog(rng, 40, 33, max_personas=3, min_personas=0)
    empty = np.flatnonzero(np.diff(offsets) == 0)
    assert len(empty) > 0
    index = MaxSimIndex(codes, scales, offsets)
    items, scores, rows = index.topk(rng.standard_normal((3, 33)).astype(np.float32), 100)
    returned = items[items >= 0]
    assert not np.isin(returned, empty).any()
    n_real = 40 - len(empty)
    assert np.all((items >= 0).sum(axis=1) == n_real)
    assert np.all(np.isneginf(scores[:, n_real:])) and np.all(rows[:, n_real:] == -1)
    s, r = index.score_candidates(np.ones(33, dtype=np.float32), empty.astype(np.int64))
    assert np.all(np.isneginf(s)) and np.all(r == -1)


def test_all_items_empty_and_zero_items():
    index = MaxSimIndex(np.zeros((0, 8), dtype=np.int8), np.zeros(0, dtype=np.float32), np.zeros(4, dtype=np.int64))
    items, scores, rows = index.topk(np.ones((2, 8), dtype=np.float32), 3)
    assert np.all(items == -1) and np.all(np.isneginf(scores)) and np.all(rows == -1)
    index = MaxSimIndex(np.zeros((0, 8), dtype=np.int8), np.zeros(0, dtype=np.float32), np.zeros(1, dtype=np.int64))
    items, _, _ = index.topk(np.ones((1, 8), dtype=np.float32), 3)
    assert items.shape == (1, 3) and np.all(items == -1)


def test_ties_break_by_lower_item_index(simd_path):
    # Identical items: every score ties, so the order must be by item index.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 64)).astype(np.float32)
    vectors = np.repeat(base, 30, axis=0)
    codes, scales = quantize(vectors)
    offsets = np.arange(31, dtype=np.int64)
    index = MaxSimIndex(codes, scales, offsets)
    items, scores, _ = index.topk(rng.standard_normal((1, 64)).astype(np.float32), 10)
    np.testing.assert_array_equal(items[0], np.arange(10))
    assert np.all(scores[0] == scores[0, 0])
    # Within an item, the first of equal personas wins.
    offsets2 = np.array([0, 10, 30], dtype=np.int64)
    index2 = MaxSimIndex(codes, scales, offsets2)
    _, rows = index2.score_candidates(base[0], np.array([1, 0], dtype=np.int64))
    np.testing.assert_array_equal(rows, [10, 0])


def test_batch_deny_allow_mask_and_threads(simd_path):
    rng = np.random.default_rng(11)
    n_items, d = 300, 65
    _, codes, scales, offsets = make_catalog(rng, n_items, d, max_personas=7)
    index = MaxSimIndex(codes, scales, offsets)
    queries = rng.standard_normal((6, d)).astype(np.float32)
    deny_lists = [rng.choice(n_items, size=rng.integers(0, 40), replace=False) for _ in range(6)]
    allow_lists = [rng.choice(n_items, size=rng.integers(0, 30), replace=True) for _ in range(6)]
    mask = np.zeros(n_items, dtype=bool)
    mask[rng.choice(n_items, 25, replace=False)] = True

    deny = lists_to_csr(deny_lists, 6)
    allow = lists_to_csr(allow_lists, 6)
    k = 12
    for n_threads in (1, 2, 4):
        got_deny = index.topk(queries, k, deny=deny, exclude_mask=mask, n_threads=n_threads)
        got_allow = index.topk(queries, k, allow=allow, n_threads=n_threads)
        for qi in range(6):
            best, best_row = reference_item_scores(codes, scales, offsets, queries[qi])
            eligible = ~mask
            eligible[deny_lists[qi]] = False
            ref = reference_topk(best, best_row, k, eligible)
            for got, want in zip(got_deny, ref):
                np.testing.assert_array_equal(got[qi], want)
            eligible = np.zeros(n_items, dtype=bool)
            eligible[allow_lists[qi]] = True  # duplicates in an allow-list count once
            ref = reference_topk(best, best_row, k, eligible)
            for got, want in zip(got_allow, ref):
                np.testing.assert_array_equal(got[qi], want)


@settings(max_examples=40, deadline=None)
@given(
    n_items=st.integers(0, 80),
    d=st.sampled_from([1, 2, 15, 16, 17, 31, 64, 65, 130]),
    max_p=st.integers(0, 16),
    k=st.integers(0, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_topk_property(n_items, d, max_p, k, seed):
    rng = np.random.default_rng(seed)
    _, codes, scales, offsets = make_catalog(rng, n_items, d, max_personas=max_p)
    # Duplicate some rows to create ties across items.
    if len(codes) > 4:
        codes[-2:] = codes[:2]
        scales[-2:] = scales[:2]
    index = MaxSimIndex(codes, scales, offsets)
    query = rng.standard_normal(d).astype(np.float32)
    best, best_row = reference_item_scores(codes, scales, offsets, query)
    for path in AVAILABLE:
        with kernels.forced_simd(path):
            got = index.topk(query[None, :], k)
        ref = reference_topk(best, best_row, k, np.ones(n_items, dtype=bool))
        for g, w in zip(got, ref):
            np.testing.assert_array_equal(g[0], w)


def test_scores_track_float_within_documented_bound():
    rng = np.random.default_rng(5)
    vectors, codes, scales, offsets = make_catalog(rng, 200, 384, max_personas=5, min_personas=1)
    index = MaxSimIndex(codes, scales, offsets)
    query = rng.standard_normal(384).astype(np.float32)
    query /= np.linalg.norm(query)
    scores, rows = index.score_candidates(query, np.arange(200, dtype=np.int64))
    float_scores = vectors[rows] @ query
    bound = kernels.score_error_bound(query, vectors[rows])
    assert np.all(np.abs(scores - float_scores) <= bound * 1.001 + 1e-6)


class TestBadInput:
    def setup_method(self):
        rng = np.random.default_rng(0)
        self.vectors, self.codes, self.scales, self.offsets = make_catalog(rng, 10, 16, max_personas=3, min_personas=1)
        self.index = MaxSimIndex(self.codes, self.scales, self.offsets)

    def test_constructor_checks(self):
        with pytest.raises(ValueError, match="dtype int8"):
            MaxSimIndex(self.codes.astype(np.int16), self.scales, self.offsets)
        with pytest.raises(ValueError, match="C-contiguous"):
            MaxSimIndex(np.asfortranarray(self.codes), self.scales, self.offsets)
        with pytest.raises(ValueError, match="one scale per persona"):
            MaxSimIndex(self.codes, self.scales[:-1], self.offsets)
        with pytest.raises(ValueError, match="dtype int64"):
            MaxSimIndex(self.codes, self.scales, self.offsets.astype(np.int32))
        bad = self.offsets.copy()
        bad[3], bad[4] = bad[4], bad[3] - 1
        with pytest.raises(ValueError, match="non-decreasing"):
            MaxSimIndex(self.codes, self.scales, bad)
        bad = self.offsets.copy()
        bad[-1] -= 1
        with pytest.raises(ValueError, match="must equal the number of persona vectors"):
            MaxSimIndex(self.codes, self.scales, bad)
        bad = self.offsets + 1
        with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
            MaxSimIndex(self.codes, self.scales, bad)
        bad_scales = self.scales.copy()
        bad_scales[2] = np.nan
        with pytest.raises(ValueError, match="scales"):
            MaxSimIndex(self.codes, bad_scales, self.offsets)

    def test_query_checks(self):
        q = np.ones(16, dtype=np.float32)
        c = np.arange(3, dtype=np.int64)
        with pytest.raises(ValueError, match="dtype float32"):
            self.index.score_candidates(q.astype(np.float64), c)
        with pytest.raises(ValueError, match="does not match the index dimension"):
            self.index.score_candidates(np.ones(15, dtype=np.float32), c)
        nan_q = q.copy()
        nan_q[3] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            self.index.score_candidates(nan_q, c)
        with pytest.raises(ValueError, match=r"not an item index in \[0, 10\)"):
            self.index.score_candidates(q, np.array([1, 10], dtype=np.int64))
        with pytest.raises(ValueError, match="not an item index"):
            self.index.score_candidates(q, np.array([-1], dtype=np.int64))
        with pytest.raises(ValueError, match="2-dimensional"):
            self.index.topk(q, 3)
        with pytest.raises(ValueError, match="k must be >= 0"):
            self.index.topk(q[None], -1)
        with pytest.raises(ValueError, match="either allow or deny"):
            self.index.topk(q[None], 3, allow=lists_to_csr([[1]], 1), deny=lists_to_csr([[1]], 1))
        with pytest.raises(ValueError, match="n_queries \\+ 1"):
            self.index.topk(q[None], 3, deny=lists_to_csr([[1], [2]], 2))
        with pytest.raises(ValueError, match="not an item index"):
            self.index.topk(q[None], 3, deny=lists_to_csr([[11]], 1))
        with pytest.raises(ValueError, match="exclude_mask"):
            self.index.topk(q[None], 3, exclude_mask=np.zeros(9, dtype=bool))
        with pytest.raises(ValueError, match="n_threads"):
            self.index.topk(q[None], 3, n_threads=0)

    def test_keeps_arrays_alive_without_copy(self):
        codes = self.codes.copy()
        index = MaxSimIndex(codes, self.scales, self.offsets)
        q = self.vectors[0]
        before = index.score_candidates(q, np.array([0], dtype=np.int64))[0][0]
        codes[:] = 0  # the index reads the caller's memory: no hidden copy
        after = index.score_candidates(q, np.array([0], dtype=np.int64))[0][0]
        assert before != after and after == 0
        del codes
        assert index.score_candidates(q, np.array([0], dtype=np.int64))[0][0] == 0

    def test_read_only_memory_works(self):
        codes = self.codes.copy()
        codes.setflags(write=False)
        index = MaxSimIndex(codes, self.scales, self.offsets)
        items, _, _ = index.topk(self.vectors[:2].copy(), 3)
        assert items.shape == (2, 3)


def test_batch_rerank_matches_single_calls(simd_path):
    rng = np.random.default_rng(21)
    _, codes, scales, offsets = make_catalog(rng, 120, 47, max_personas=6)
    index = MaxSimIndex(codes, scales, offsets)
    queries = rng.standard_normal((5, 47)).astype(np.float32)
    lists = [rng.integers(0, 120, size=rng.integers(0, 40)) for _ in range(5)]
    csr = lists_to_csr(lists, 5)
    for n_threads in (1, 3):
        scores, rows = index.score_candidates_batch(queries, csr, n_threads=n_threads)
        for i in range(5):
            s, r = index.score_candidates(queries[i], np.asarray(lists[i], dtype=np.int64))
            np.testing.assert_array_equal(scores[csr[0][i]:csr[0][i + 1]], s)
            np.testing.assert_array_equal(rows[csr[0][i]:csr[0][i + 1]], r)
    with pytest.raises(ValueError, match="not an item index"):
        index.score_candidates_batch(queries[:1], lists_to_csr([[120]], 1))
    with pytest.raises(ValueError, match="n_queries \\+ 1"):
        index.score_candidates_batch(queries, lists_to_csr([[1]], 1))


@pytest.mark.parametrize("d", [1, 5, 31, 32, 33, 63, 64, 65, 100, 384, 385])
@pytest.mark.parametrize("n_queries", [2, 3, 4, 5, 7, 9, 16])
def test_batch_tiles_match_the_scalar_reference(simd_path, d, n_queries):
    # A batch goes through the tiled kernel (queries x rows per register tile, with
    # leftover queries, leftover rows and dimension tails): every item's exact score
    # must equal the per-query reference, so ask for every item (k = n_items).
    rng = np.random.default_rng(d * 100 + n_queries)
    _, codes, scales, offsets = make_catalog(rng, 150, d, max_personas=7)
    index = MaxSimIndex(codes, scales, offsets)
    queries = rng.standard_normal((n_queries, d)).astype(np.float32)
    k = len(offsets) - 1
    items, scores, rows = index.topk(queries, k)
    for u in range(n_queries):
        best, best_row = reference_item_scores(codes, scales, offsets, queries[u])
        ref = reference_topk(best, best_row, k, np.ones(k, dtype=bool))
        np.testing.assert_array_equal(items[u], ref[0])
        np.testing.assert_array_equal(scores[u], ref[1])
        np.testing.assert_array_equal(rows[u], ref[2])
