"""A small Python client for the Ray Serve index (``persona4rec serve``). Needs httpx, not Ray.

Results have the shapes and types of :class:`persona4rec.PersonaIndex` (1-D ids and float32
scores for one user, ``(n_users, k)`` arrays padded with ``-1``/``None`` and ``-inf`` for a
batch). Scores travel as JSON doubles, which hold every float32 exactly, so they compare equal
to in-process results.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from persona4rec.index import PersonaMatch, UnknownItemError
from persona4rec.sharded import ShardedRerankResult

__all__ = ["IndexClient", "ShardUnavailableError"]


class ShardUnavailableError(RuntimeError):
    """The service could not reach every shard in time (HTTP 503): no complete answer, retry later."""


class IndexClient:
    """``IndexClient("http://127.0.0.1:8000")``: search, rerank, explain and health over HTTP."""

    def __init__(self, base_url: str, *, timeout: float = 60.0, deadline_s: float | None = None):
        import httpx

        self.base_url = base_url.rstrip("/")
        # how long the server may retry an unavailable shard for our queries (None: its own deadline)
        self.deadline_s = deadline_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._id_kind: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "IndexClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, route: str, body: dict) -> dict:
        if self.deadline_s is not None:
            body = {**body, "deadline_s": self.deadline_s}
        return self._answer(self._http.post(f"/{route}", json=body))

    @staticmethod
    def _answer(response) -> dict:
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text}
        if response.status_code == 200:
            if not data.get("complete", True):  # never happens; guard the contract anyway
                raise ShardUnavailableError("the service returned an incomplete answer")
            return data
        message = data.get("error", response.text) if isinstance(data, dict) else response.text
        if response.status_code == 503:
            raise ShardUnavailableError(message)
        if response.status_code == 404 and data.get("kind") == "unknown_item":
            raise UnknownItemError(message)
        if response.status_code == 400:
            raise ValueError(message)
        raise RuntimeError(f"HTTP {response.status_code} from {response.url}: {message}")

    def health(self) -> dict:
        data = self._answer(self._http.get("/health"))
        self._id_kind = data.get("id_kind")
        return data

    def _kind(self) -> str:
        if self._id_kind is None:
            self.health()
        return self._id_kind or "str"

    def search(self, user_vecs, k: int = 10, exclude=None, allow=None, *, return_personas: bool = False,
               unknown: str = "error"):
        q = np.asarray(user_vecs, dtype=np.float32)
        body: dict[str, Any] = {"k": int(k), "unknown": unknown}
        body["user" if q.ndim == 1 else "users"] = q.tolist()
        if exclude is not None:
            body["exclude"] = _jsonable(exclude)
        if allow is not None:
            body["allow"] = _jsonable(allow)
        data = self._post("search", body)
        if q.ndim == 1:
            ids = np.asarray(data["ids"], dtype=np.int64 if self._kind() == "int" else object)
            out = (ids, np.asarray(data["scores"], dtype=np.float32))
            return out + (np.asarray(data["persona_ids"], dtype=object),) if return_personas else out
        n, kk = len(data["results"]), int(k)
        int_ids = self._kind() == "int"
        ids = np.full((n, kk), -1, dtype=np.int64) if int_ids else np.full((n, kk), None, dtype=object)
        scores = np.full((n, kk), -np.inf, dtype=np.float32)
        personas = np.full((n, kk), None, dtype=object)
        for u, r in enumerate(data["results"]):
            m = len(r["ids"])
            ids[u, :m] = r["ids"]
            scores[u, :m] = r["scores"]
            personas[u, :m] = r["persona_ids"]
        return (ids, scores, personas) if return_personas else (ids, scores)

    def rerank(self, user_vec, candidate_ids, base_scores=None, alpha: float = 1.0, *,
               unknown: str = "error") -> ShardedRerankResult:
        body: dict[str, Any] = {"user": np.asarray(user_vec, dtype=np.float32).tolist(),
                                "candidates": _jsonable(list(candidate_ids)), "alpha": float(alpha),
                                "unknown": unknown}
        if base_scores is not None:
            body["base_scores"] = np.asarray(base_scores, dtype=np.float32).tolist()
        data = self._post("rerank", body)
        return ShardedRerankResult(data["ids"], np.asarray(data["scores"], dtype=np.float32),
                                   np.asarray(data["persona_scores"], dtype=np.float32), data["persona_ids"])

    def explain(self, user_vec, item_id) -> list[PersonaMatch]:
        data = self._post("explain", {"user": np.asarray(user_vec, dtype=np.float32).tolist(),
                                      "item_id": _jsonable(item_id)})
        return [PersonaMatch(**m) for m in data["personas"]]


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
