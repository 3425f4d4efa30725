"""CF baselines against independent formulas and planted structure; candidates and fusion."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from persona4rec.evaluation.baselines import BPR, EASE, ItemKNN, Popularity, interaction_matrix
from persona4rec.evaluation.candidates import (
    candidate_lists,
    ceiling,
    exclude_history,
    fuse,
    fused_rerank,
    minmax_rows,
    rerank,
)


def random_matrix(seed: int = 0, users: int = 30, items: int = 12, density: float = 0.3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((users, items)) < density).astype(np.float32)
    return sp.csr_matrix(dense)


def test_interaction_matrix_is_binary() -> None:
    m = interaction_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), 2, 3)
    assert m.toarray().tolist() == [[0, 0, 1], [1, 0, 0]]


def test_popularity_counts_train_interactions() -> None:
    x = random_matrix()
    scores = Popularity().fit(x).score(x, np.array([0, 5]))
    assert scores.shape == (2, 12)
    assert scores[1].tolist() == np.asarray(x.sum(axis=0)).ravel().tolist()


def test_itemknn_matches_hand_computed_cosine_with_shrink() -> None:
    x = random_matrix(1)
    model = ItemKNN(shrink=2.0, neighbors=None).fit(x)
    dense = x.toarray()
    i, j = 3, 7
    overlap = (dense[:, i] * dense[:, j]).sum()
    expected = overlap / (np.sqrt(dense[:, i].sum() * dense[:, j].sum()) + 2.0)
    assert model.similarity[i, j] == pytest.approx(expected, rel=1e-5)
    assert np.all(np.diag(model.similarity) == 0)
    users = np.arange(5)
    assert np.allclose(model.score(x, users), dense[users] @ model.similarity, atol=1e-5)
    pruned = ItemKNN(shrink=2.0, neighbors=3).fit(x).similarity
    assert ((pruned > 0).sum(axis=0) <= 3 + 2).all()  # ties at the cut may keep a few more
    assert ((pruned > 0).sum(axis=0) < (model.similarity > 0).sum(axis=0)).any()


def test_ease_equals_per_column_constrained_ridge_regression() -> None:
    x = random_matrix(2).toarray().astype(np.float64)
    l2 = 3.0
    weights = EASE(l2).fit(sp.csr_matrix(x)).weights
    for j in (0, 5, 11):
        others = [c for c in range(x.shape[1]) if c != j]
        a = x[:, others]
        solution = np.linalg.solve(a.T @ a + l2 * np.eye(len(others)), a.T @ x[:, j])
        assert np.allclose(weights[others, j], solution, atol=1e-4)
        assert weights[j, j] == 0


def planted_blocks(n_users: int = 60, n_items: int = 20, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Two user groups, each interacting only within its own half of the catalog."""
    rng = np.random.default_rng(seed)
    group = np.arange(n_users) % 2
    rows, cols = [], []
    for u in range(n_users):
        half = np.arange(n_items // 2) + group[u] * (n_items // 2)
        for i in rng.choice(half, size=5, replace=False):
            rows.append(u)
            cols.append(i)
    return interaction_matrix(np.array(rows), np.array(cols), n_users, n_items), group


def test_bpr_learns_planted_blocks_and_fold_in_only_touches_users_with_new_history() -> None:
    x, group = planted_blocks()
    model = BPR(factors=8, lr=0.05, reg=0.01, epochs=60, seed=1).fit(x)
    users = np.arange(x.shape[0])
    scores = exclude_history(model.score(x, users), x, users)
    half = x.shape[1] // 2
    own = np.where(group[:, None] == 0, scores[:, :half].max(axis=1)[:, None], scores[:, half:].max(axis=1)[:, None])
    other = np.where(group[:, None] == 0, scores[:, half:].max(axis=1)[:, None], scores[:, :half].max(axis=1)[:, None])
    assert (own > other).mean() > 0.9
    # Every user is folded in from their history (as served): the same history gives the
    # same scores, and a new item changes only that user.
    unchanged = model.score(x, users)
    assert np.allclose(unchanged, model.score(x, users))
    grown = x.tolil()
    grown[0, half + 1] = 1.0
    after = model.score(grown.tocsr(), users)
    assert not np.allclose(after[0], unchanged[0])
    assert np.allclose(after[1:], unchanged[1:])
    # The grown user is scored exactly as a served request with that history (no user id).
    top, top_scores = model.recommend(grown.tocsr()[0], k=5, exclude_seen=False)
    assert np.allclose(top_scores, np.sort(after[0])[::-1][:5], atol=1e-5)
    again = BPR(factors=8, lr=0.05, reg=0.01, epochs=60, seed=1).fit(x)
    assert np.allclose(again.item_factors, model.item_factors)  # seeded: reproducible


def test_candidates_ceiling_and_rerank() -> None:
    x = sp.csr_matrix(np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=np.float32))
    users = np.array([0, 1])
    base = exclude_history(np.array([[9, 1, 2, 3, 4], [5, 4, 3, 2, 1]], dtype=np.float64), x, users)
    assert np.isneginf(base[0, 0]) and np.isneginf(base[1, 4])
    cands = candidate_lists(base, 3)
    assert cands.tolist() == [[4, 3, 2], [0, 1, 2]]
    assert ceiling(cands, np.array([2, 3])).tolist() == [1.0, 0.0]
    text = np.array([[0, 0, 0.9, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    assert rerank(cands, text).tolist() == [[2, 4, 3], [2, 1, 0]]


def test_fusion_endpoints_and_minmax() -> None:
    assert minmax_rows(np.array([[2.0, 4.0, -np.inf], [1.0, 1.0, 1.0]])).tolist() == [[0.0, 1.0, -np.inf],
                                                                                      [0.0, 0.0, 0.0]]
    cands = np.array([[0, 1, 2]])
    text = np.array([[0.1, 0.9, 0.5]])
    base = np.array([[3.0, 1.0, 2.0]])
    assert fused_rerank(cands, text, base, 1.0).tolist() == [[1, 2, 0]]
    assert fused_rerank(cands, text, base, 0.0).tolist() == [[0, 2, 1]]
    assert fuse(text, base, 0.5)[0].tolist() == pytest.approx([0.55, 0.45, 0.5])


def test_fused_rerank_matches_persona_index_rerank() -> None:
    index_module = pytest.importorskip("persona4rec.index")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((25, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    offsets = np.array([0, 3, 5, 9, 10, 14, 16, 20, 21, 25], dtype=np.int64)
    index = index_module.PersonaIndex.build(np.arange(9), vectors, offsets)
    user = rng.standard_normal(16).astype(np.float32)
    user /= np.linalg.norm(user)
    cands = np.array([[7, 2, 5, 0, 8]])
    base = np.full((1, 9), -np.inf)
    base[0, cands[0]] = [5.0, 4.0, 3.5, 1.0, 0.5]
    text = np.full((1, 9), -np.inf)
    text[0, cands[0]] = [float(index.rerank(user, [int(c)]).scores[0]) for c in cands[0]]
    for alpha in (0.0, 0.3, 1.0):
        served = index.rerank(user, cands[0].tolist(), base_scores=base[0, cands[0]], alpha=alpha)
        ours = fused_rerank(cands, text, base, alpha)[0]
        assert list(served.ids) == ours.tolist()
