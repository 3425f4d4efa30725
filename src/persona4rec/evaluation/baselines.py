"""Collaborative-filtering baselines on implicit feedback: popularity, ItemKNN, EASE, BPR-MF.

Every model is fitted on a binary (users x items) train matrix and scores users from a
*history* matrix with the same shape. At validation time the history is the train
matrix; at test time it also holds each user's validation item (known history), while
the item-side model stays the one fitted on train only.

Every model also serves one user the way implicit's models do: ``fit(train)`` then
``recommend(user_items, k, exclude_seen)`` with the user's item positions (or a 1 x
n_items CSR row), returning ``(item_positions, scores)`` best first. :class:`CFRetriever`
puts item ids around a model, which makes it a first stage of
:class:`persona4rec.recommender.Recommender` (and saves/loads without pickle).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np
import scipy.sparse as sp


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary CSR matrix with a 1 at each (user, item) pair (duplicates collapse to 1)."""
    data = np.ones(len(users), dtype=np.float32)
    m = sp.csr_matrix((data, (np.asarray(users), np.asarray(items))), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


def history_row(user_items: Any, n_items: int) -> sp.csr_matrix:
    """One user's history as a 1 x ``n_items`` binary CSR row, from item positions or a CSR row."""
    if sp.issparse(user_items):
        row = sp.csr_matrix(user_items, dtype=np.float32)
        if row.shape != (1, n_items):
            raise ValueError(f"user_items must be a 1 x {n_items} row, got shape {row.shape}")
        return row
    positions = np.unique(np.asarray(list(user_items), dtype=np.int64))
    if len(positions) and (positions[0] < 0 or positions[-1] >= n_items):
        raise ValueError(f"user_items holds an item position outside 0..{n_items - 1}; map item ids to the "
                         "positions the model was fitted on (CFRetriever does that)")
    # Built directly as CSR (sorted, unique indices): the per-request path, no COO round trip.
    return sp.csr_matrix((np.ones(len(positions), dtype=np.float32), positions, np.array([0, len(positions)])),
                         shape=(1, n_items))


class _Recommends:
    """``recommend`` for one user on top of a model's ``score_row`` (implicit's protocol)."""

    n_items: int

    def score_row(self, row: sp.csr_matrix) -> np.ndarray:  # pragma: no cover - every model overrides
        raise NotImplementedError

    def recommend(self, user_items: Any, k: int = 10, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item positions and scores for one user's history, best first (ties by position)."""
        row = history_row(user_items, self.n_items)
        scores = np.asarray(self.score_row(row), dtype=np.float64).ravel().copy()
        if exclude_seen:
            scores[row.indices] = -np.inf
        eligible = int(np.isfinite(scores).sum())
        k = min(int(k), eligible)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        part = np.argpartition(-scores, k - 1)[:k]
        order = np.lexsort((part, -scores[part]))
        top = part[order]
        return top.astype(np.int64), scores[top]


class Popularity(_Recommends):
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

    @property
    def n_items(self) -> int:
        return len(self.counts)

    def score_row(self, row: sp.csr_matrix) -> np.ndarray:
        return self.counts.astype(np.float64)

    def params(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.counts = np.asarray(arrays["counts"], dtype=np.float32)


class ItemKNN(_Recommends):
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

    @property
    def n_items(self) -> int:
        return self.similarity.shape[0]

    def score_row(self, row: sp.csr_matrix) -> np.ndarray:
        return np.asarray(row @ self.similarity).ravel()

    def params(self) -> dict[str, Any]:
        return {"shrink": self.shrink, "neighbors": self.neighbors}

    def state(self) -> dict[str, np.ndarray]:
        return {"similarity": self.similarity}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.similarity = np.asarray(arrays["similarity"], dtype=np.float32)


class EASE(_Recommends):
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

    @property
    def n_items(self) -> int:
        return self.weights.shape[0]

    def score_row(self, row: sp.csr_matrix) -> np.ndarray:
        return np.asarray(row @ self.weights).ravel()

    def params(self) -> dict[str, Any]:
        return {"l2": self.l2}

    def state(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = np.asarray(arrays["weights"], dtype=np.float32)


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
class BPR(_Recommends):
    """Matrix factorisation trained with BPR (Rendle et al., 2009) by SGD in numba.

    One epoch draws as many (user, positive, negative) triples as there are train
    interactions; users are drawn uniformly. At scoring time, users whose history has
    user is folded in from their history with the item factors frozen ("fold-in",
    ``fold_in_epochs`` epochs over the history, from the mean user, as a served request
    without a user id is), so the item side never sees anything but train and the trained
    per-user factors serve only as the starting point's mean.
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
        """User factors for ``users`` from their ``history`` rows alone, exactly as a served
        request is scored (:meth:`score_row`: from the mean user, item side frozen, seeded
        per history): a service answers a history, not a user id, so the trained per-user
        factors are not used, and the harness measures what
        :class:`persona4rec.recommender.Recommender` serves."""
        assert self.user_factors is not None, "fit first"
        sub = history[users].tocsr()
        sub.sort_indices()
        return np.stack([self._fold_in_row(sub[row]) for row in range(len(users))]) if len(users) else \
            np.zeros((0, self.factors))

    def _fold_in_row(self, row: sp.csr_matrix) -> np.ndarray:
        """Factors of one history (1 x n_items) with the item side frozen, from the mean user."""
        start = self.user_factors.mean(axis=0) if self.user_factors is not None and len(self.user_factors) else \
            np.zeros(self.factors)
        factors = np.ascontiguousarray(start[None, :], dtype=np.float64)
        part = sp.csr_matrix(row)
        part.sort_indices()
        if part.nnz:
            seed, epoch = _bpr_kernels()
            seed(self.seed)  # the same history always gets the same factors
            frozen_items, frozen_bias = self.item_factors.copy(), self.item_bias.copy()
            for _ in range(self.fold_in_epochs):
                epoch(part.indptr, part.indices, factors, frozen_items, frozen_bias, self.lr, self.reg,
                      int(part.nnz), False)
        return factors[0]

    def score(self, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
        assert self.item_factors is not None, "fit first"
        user_f = self.fold_in(history, users)
        return (user_f @ self.item_factors.T + self.item_bias[None, :]).astype(np.float32)

    @property
    def n_items(self) -> int:
        return self.item_factors.shape[0]

    def score_row(self, row: sp.csr_matrix) -> np.ndarray:
        """Scores for one history (a served request: no user id, so no trained user factors):
        factors folded in from the mean user's with the item side frozen."""
        assert self.item_factors is not None, "fit first"
        return self._fold_in_row(row) @ self.item_factors.T + self.item_bias

    def params(self) -> dict[str, Any]:
        return {"factors": self.factors, "lr": self.lr, "reg": self.reg, "epochs": self.epochs,
                "fold_in_epochs": self.fold_in_epochs, "seed": self.seed}

    def state(self) -> dict[str, np.ndarray]:
        return {"item_factors": self.item_factors, "item_bias": self.item_bias,
                "mean_user_factors": self.user_factors.mean(axis=0, keepdims=True)}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.item_factors = np.asarray(arrays["item_factors"], dtype=np.float64)
        self.item_bias = np.asarray(arrays["item_bias"], dtype=np.float64)
        self.user_factors = np.asarray(arrays["mean_user_factors"], dtype=np.float64)


MODELS = {"popularity": Popularity, "ItemKNN": ItemKNN, "EASE": EASE, "BPR": BPR}


class CFRetriever:
    """A fitted CF model with item ids around it: the first stage of a
    :class:`persona4rec.recommender.Recommender` (``recommend(history_item_ids, k,
    exclude_seen) -> (item_ids, scores)``). History ids the model never saw are ignored."""

    FORMAT = "persona4rec.cf-retriever"

    def __init__(self, model: Any, item_ids: Sequence[Hashable]) -> None:
        if getattr(model, "name", None) not in MODELS:
            raise TypeError(f"model must be one of {', '.join(MODELS)}, got {type(model).__name__}")
        if len(item_ids) != model.n_items:
            raise ValueError(f"{len(item_ids)} item ids for a model over {model.n_items} items")
        self.model = model
        self.item_ids = list(item_ids)
        self._position = {item: pos for pos, item in enumerate(self.item_ids)}

    def __repr__(self) -> str:
        return f"CFRetriever({self.model.name}, {len(self.item_ids)} items, {self.model.params()})"

    def recommend(self, history_item_ids: Sequence[Hashable], k: int = 10,
                  exclude_seen: bool = True) -> tuple[list, np.ndarray]:
        positions = [self._position[i] for i in history_item_ids if i in self._position]
        top, scores = self.model.recommend(positions, k=min(int(k), len(self.item_ids)), exclude_seen=exclude_seen)
        return [self.item_ids[p] for p in top], scores

    def save(self, path: str | os.PathLike) -> None:
        """An ``.npz`` of plain arrays (loads with ``allow_pickle=False``)."""
        header = {"format": self.FORMAT, "version": 1, "model": self.model.name, "params": self.model.params(),
                  "id_kind": "int" if all(isinstance(i, (int, np.integer)) for i in self.item_ids) else "str"}
        arrays = {f"state_{k}": v for k, v in self.model.state().items()}
        ids = np.asarray(self.item_ids, dtype=np.int64 if header["id_kind"] == "int" else str)
        with open(os.fspath(path), "wb") as fh:
            np.savez(fh, header=np.asarray(json.dumps(header)), item_ids=ids, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CFRetriever":
        with np.load(os.fspath(path), allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != cls.FORMAT:
                raise ValueError(f"{os.fspath(path)} is not a {cls.FORMAT} file")
            model = MODELS[header["model"]](**header["params"]) if header["model"] != "popularity" else Popularity()
            model.set_state({k.removeprefix("state_"): data[k] for k in data.files if k.startswith("state_")})
            ids = data["item_ids"].tolist()
        return cls(model, ids)
