"""Collaborative-filtering baselines on implicit feedback: popularity, ItemKNN, EASE, BPR-MF.

Every model is fitted on a binary (users x items) train matrix and scores users from a
*history* matrix with the same shape. At validation time the history is the train
matrix; at test time it also holds each user's validation item (known history), while
the item-side model stays the one fitted on train only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary CSR matrix with a 1 at each (user, item) pair (duplicates collapse to 1)."""
    data = np.ones(len(users), dtype=np.float32)
    m = sp.csr_matrix((data, (np.asarray(users), np.asarray(items))), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


class Popularity:
    """Scores every item by its number of train interactions."""

    name = "popularity"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, train: sp.csr_matrix) -> "Popularity":
        self.counts = np.asarray(train.sum(axis=0)).ravel().astype(np.float32)
        return self

    def score(self, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
        assert self.counts is not None, "fit first"
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()

    def params(self) -> dict[str, Any]:
        return {}


class ItemKNN:
    """Item-item cosine similarity with shrinkage, keeping each item's ``neighbors`` best.

    ``sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink)``; a user's score for j is
    the sum of ``sim(i, j)`` over the items i in their history.
    """

    name = "ItemKNN"

    def __init__(self, shrink: float = 10.0, neighbors: int | None = 100) -> None:
        self.shrink = shrink
        self.neighbors = neighbors
        self.similarity: np.ndarray | None = None

    def fit(self, train: sp.csr_matrix) -> "ItemKNN":
        x = train.astype(np.float64)
        co = (x.T @ x).toarray()
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if self.neighbors is not None and self.neighbors < sim.shape[0]:
            # Keep the strongest neighbours of each target item (column).
            cut = np.partition(sim, -self.neighbors, axis=0)[-self.neighbors, :]
            sim = np.where(sim >= cut[None, :], sim, 0.0)
        self.similarity = sim.astype(np.float32)
        return self

    def score(self, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
        assert self.similarity is not None, "fit first"
        return np.asarray(history[users] @ self.similarity, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"shrink": self.shrink, "neighbors": self.neighbors}


class EASE:
    """EASE (Steck, 2019): ``B = I - P diag(1/diag(P))`` with ``P = (X^T X + lambda I)^-1``."""

    name = "EASE"

    def __init__(self, l2: float = 100.0) -> None:
        self.l2 = l2
        self.weights: np.ndarray | None = None

    def fit(self, train: sp.csr_matrix) -> "EASE":
        x = train.astype(np.float64)
        gram = (x.T @ x).toarray()
        gram[np.diag_indices_from(gram)] += self.l2
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.weights = b.astype(np.float32)
        return self

    def score(self, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
        assert self.weights is not None, "fit first"
        return np.asarray(history[users] @ self.weights, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"l2": self.l2}


@functools.lru_cache(maxsize=None)
def _bpr_kernels():
    # numba is imported lazily: compiling costs a second or two and is only needed here.
    import numba

    @numba.njit(cache=True)
    def seed(value):
        np.random.seed(value)

    @numba.njit(cache=True)
    def epoch(indptr, indices, user_f, item_f, item_b, lr, reg, n_samples, update_items):
        n_users = len(indptr) - 1
        n_items = item_f.shape[0]
        dim = user_f.shape[1]
        loss = 0.0
        for _ in range(n_samples):
            u = np.random.randint(n_users)
            start, stop = indptr[u], indptr[u + 1]
            if stop == start:
                continue
            i = indices[start + np.random.randint(stop - start)]
            # Rejection-sample a negative; histories are tiny relative to the catalog.
            while True:
                j = np.random.randint(n_items)
                found = False
                for p in range(start, stop):
                    if indices[p] == j:
                        found = True
                        break
                if not found:
                    break
            x = item_b[i] - item_b[j]
            for f in range(dim):
                x += user_f[u, f] * (item_f[i, f] - item_f[j, f])
            z = 1.0 / (1.0 + np.exp(x))  # = 1 - sigmoid(x), the gradient scale of log sigmoid
            loss += np.log1p(np.exp(-x)) if x > -30 else -x
            for f in range(dim):
                wu = user_f[u, f]
                hi = item_f[i, f]
                hj = item_f[j, f]
                user_f[u, f] += lr * (z * (hi - hj) - reg * wu)
                if update_items:
                    item_f[i, f] += lr * (z * wu - reg * hi)
                    item_f[j, f] += lr * (-z * wu - reg * hj)
            if update_items:
                item_b[i] += lr * (z - reg * item_b[i])
                item_b[j] += lr * (-z - reg * item_b[j])
        return loss

    return seed, epoch


@dataclass
class BPR:
    """Matrix factorisation trained with BPR (Rendle et al., 2009) by SGD in numba.

    One epoch draws as many (user, positive, negative) triples as there are train
    interactions; users are drawn uniformly. At scoring time, users whose history has
    interactions beyond train get their factors re-fitted with the item factors frozen
    ("fold-in", ``fold_in_epochs`` epochs over their history), so the item side never
    sees anything but train.
    """

    factors: int = 64
    lr: float = 0.05
    reg: float = 0.001
    epochs: int = 100
    fold_in_epochs: int = 20
    seed: int = 0
    name: str = "BPR"
    user_factors: np.ndarray | None = field(default=None, repr=False)
    item_factors: np.ndarray | None = field(default=None, repr=False)
    item_bias: np.ndarray | None = field(default=None, repr=False)
    _train: sp.csr_matrix | None = field(default=None, repr=False)

    def start(self, train: sp.csr_matrix) -> "BPR":
        """Initialise factors (call :meth:`train_epochs` next); :meth:`fit` does both."""
        rng = np.random.default_rng(self.seed)
        n_users, n_items = train.shape
        self.user_factors = (rng.standard_normal((n_users, self.factors)) * 0.1).astype(np.float64)
        self.item_factors = (rng.standard_normal((n_items, self.factors)) * 0.1).astype(np.float64)
        self.item_bias = np.zeros(n_items, dtype=np.float64)
        self._train = train.tocsr()
        self._train.sort_indices()
        seed, _ = _bpr_kernels()
        seed(self.seed)
        return self

    def train_epochs(self, n: int) -> float:
        """Run ``n`` more epochs; returns the mean BPR loss of the last one."""
        assert self._train is not None, "start first"
        _, epoch = _bpr_kernels()
        loss = 0.0
        n_samples = int(self._train.nnz)
        for _ in range(n):
            loss = epoch(self._train.indptr, self._train.indices, self.user_factors, self.item_factors,
                         self.item_bias, self.lr, self.reg, n_samples, True)
        return loss / max(1, n_samples)

    def fit(self, train: sp.csr_matrix) -> "BPR":
        self.start(train)
        self.train_epochs(self.epochs)
        return self

    def fold_in(self, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
        """User factors for ``users`` given ``history``: the trained ones where the history
        equals train, else re-fitted with the item factors frozen."""
        assert self._train is not None and self.user_factors is not None
        user_f = self.user_factors[users].copy()
        sub = history[users].tocsr()
        sub.sort_indices()
        changed = np.asarray((sub != self._train[users]).sum(axis=1)).ravel() > 0
        if changed.any():
            rows = np.flatnonzero(changed)
            part = sub[rows].tocsr()
            part.sort_indices()
            factors = user_f[rows].copy()
            _, epoch = _bpr_kernels()
            frozen_items = self.item_factors.copy()
            frozen_bias = self.item_bias.copy()
            for _ in range(self.fold_in_epochs):
                epoch(part.indptr, part.indices, factors, frozen_items, frozen_bias,
                      self.lr, self.reg, int(part.nnz), False)
            user_f[rows] = factors
        return user_f

    def score(self, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
        assert self.item_factors is not None, "fit first"
        user_f = self.fold_in(history, users)
        return (user_f @ self.item_factors.T + self.item_bias[None, :]).astype(np.float32)

    def params(self) -> dict[str, Any]:
        return {"factors": self.factors, "lr": self.lr, "reg": self.reg, "epochs": self.epochs,
                "fold_in_epochs": self.fold_in_epochs, "seed": self.seed}
