"""Serving a :class:`~persona4rec.ShardedPersonaIndex` on Ray Serve.

One deployment per shard (``shard-0``, ``shard-1``, ...; each replica memory-maps its shard
file read-only) and one ``router`` deployment, the HTTP ingress. The router fans a query out
to every shard, waits for all of them and merges the exact top-k with the same code as the
in-process index (:func:`persona4rec.sharded.format_topk`), so answers are identical to one
PersonaIndex.

A shard that does not answer (its replica died, or is restarting) is retried until
``retry_deadline_s``; then the query fails with HTTP 503 and ``"complete": false``. A
partial top-k is never returned: every answer either holds every shard's contribution or is
an error.

Endpoints (JSON): ``POST /search``, ``POST /rerank``, ``POST /explain``, ``GET /health``. A
request body may carry ``deadline_s`` to wait less than the server's ``retry_deadline_s``.
:class:`persona4rec.scale.client.IndexClient` speaks them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from persona4rec.index import UnknownItemError
from persona4rec.scale import require_ray
from persona4rec.scale.client import ShardUnavailableError
from persona4rec.sharded import (
    IndexShard,
    check_user_vectors,
    format_topk,
    fuse_rerank,
    read_manifest,
    route_candidates,
    route_lists,
    shard_of,
)

ray = require_ray()
from ray import serve  # noqa: E402  (after the friendly import check)

APP_NAME = "persona4rec"


@serve.deployment
class ShardServer:
    """One shard of the index, memory-mapped. Queries run in a worker thread: the native scan
    releases the GIL, so one replica serves several queries at once."""

    def __init__(self, index_dir: str, shard_no: int, verify: bool = True):
        self.shard_no = shard_no
        self.shard = IndexShard.open(index_dir, shard_no, mmap=True, verify=verify)
        if self.shard.index is not None:
            self.shard.ordinal_map()  # build the id -> ordinal map before the first query

    async def topk(self, q2: np.ndarray, k: int, exclude, allow, return_personas: bool):
        return await asyncio.to_thread(self.shard.topk, q2, k, exclude, allow, return_personas=return_personas)

    async def persona_scores(self, q: np.ndarray, candidates: list, unknown: str):
        return await asyncio.to_thread(self.shard.persona_scores, q, candidates, unknown)

    async def explain(self, q: np.ndarray, item_id) -> list[dict]:
        index = self.shard.index
        if index is None or item_id not in index:
            raise UnknownItemError(f"item {item_id!r} is not in the index (or was removed)")
        return [m.__dict__ for m in await asyncio.to_thread(index.explain, q, item_id)]

    def unknown_ids(self, ids: list) -> list:
        index = self.shard.index
        return [x for x in ids if index is None or x not in index]

    def info(self) -> dict:
        index = self.shard.index
        return {"shard": self.shard_no, "n_items": 0 if index is None else index.n_items,
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


class _BadRequest(ValueError):
    pass


def _is_replica_failure(exc: BaseException) -> bool:
    """Errors that mean "this replica is gone or not reachable now", worth a retry elsewhere or later."""
    from ray import exceptions as rex

    retriable: tuple[type, ...] = (rex.RayActorError, rex.ActorUnavailableError)
    for name in ("ActorDiedError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError"):
        if hasattr(rex, name):
            retriable += (getattr(rex, name),)
    return isinstance(exc, retriable) and not isinstance(exc, rex.RayTaskError)


@serve.deployment
class Router:
    """HTTP ingress: validates a query, fans it out to every shard, merges exactly."""

    def __init__(self, index_dir: str, retry_deadline_s: float, *shards):
        meta = read_manifest(index_dir)
        self.n_shards = meta["n_shards"]
        self.dim = meta["dim"]
        self.id_kind = meta["id_kind"]
        self.encoder = meta.get("encoder")
        self.retry_deadline_s = float(retry_deadline_s)
        if len(shards) != self.n_shards:
            raise ValueError(f"the index has {self.n_shards} shards, the router got {len(shards)} handles")
        self.shards = list(shards)

    # ------------------------------------------------------------------ fan-out
    def _budget(self, body: dict) -> float:
        """Seconds a query may wait for unavailable shards: the request's ``deadline_s`` if it asks for
        less patience than the server's retry deadline, never more."""
        asked = body.get("deadline_s")
        if asked is None:
            return self.retry_deadline_s
        if isinstance(asked, bool) or not isinstance(asked, (int, float)) or asked <= 0:
            raise _BadRequest(f"deadline_s must be a positive number of seconds, got {asked!r}")
        return min(float(asked), self.retry_deadline_s)

    async def _call(self, budget: float, s: int, method: str, *args) -> Any:
        """One shard's answer, retried while its replica is unavailable, until ``budget`` seconds pass."""
        deadline = time.monotonic() + budget
        delay, attempt = 0.05, 0
        last: BaseException | None = None
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                break
            response = getattr(self.shards[s], method).remote(*args)
            try:
                return await asyncio.wait_for(response, timeout=left)
            except asyncio.TimeoutError as e:
                response.cancel()
                last = e
                break
            except Exception as e:  # noqa: BLE001 - sorted below
                if not _is_replica_failure(e):
                    raise
                last = e
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
        raise ShardUnavailableError(
            f"shard {s} did not answer within {budget:g} s ({attempt} attempts; last error: "
            f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}); no partial result is returned, "
            "retry the query")

    async def _fan(self, budget: float, method: str, args_of: dict[int, tuple]) -> dict[int, Any]:
        shards = list(args_of)
        results = await asyncio.gather(*(self._call(budget, s, method, *args_of[s]) for s in shards))
        return dict(zip(shards, results))

    # ------------------------------------------------------------------ queries
    async def search(self, body: dict) -> dict:
        budget = self._budget(body)
        single = "user" in body
        if single == ("users" in body):
            raise _BadRequest("give either 'user' (one vector) or 'users' (a list of vectors)")
        q, one = check_user_vectors(np.asarray(body["user"] if single else body["users"], dtype=np.float32), self.dim)
        if one != single:
            raise _BadRequest("'user' must be one vector, 'users' a list of vectors")
        k = body.get("k", 10)
        if not isinstance(k, int) or k < 0:
            raise _BadRequest(f"k must be a non-negative integer, got {k!r}")
        exclude, allow = body.get("exclude"), body.get("allow")
        if exclude is not None and allow is not None:
            raise _BadRequest("pass either exclude or allow, not both")
        unknown = body.get("unknown", "error")
        if unknown not in ("error", "skip"):
            raise _BadRequest("unknown must be 'error' or 'skip'")
        q2 = q[None, :] if single else q
        deny = route_lists(exclude, self.n_shards, len(q2), single, "exclude")
        allowed = route_lists(allow, self.n_shards, len(q2), single, "allow")
        return_personas = True
        if allow is not None and unknown == "error":
            await self._check_known(budget, [x for lst in ([allow] if single else allow) for x in lst])
        parts = await self._fan(budget, "topk", {s: (q2, k, None if deny is None else deny[s],
                                             None if allowed is None else allowed[s], return_personas)
                                         for s in range(self.n_shards)})
        ids, scores, personas = format_topk([parts[s] for s in range(self.n_shards)], len(q2), k, single,
                                            return_personas, self.id_kind)
        if single:
            return {"ids": ids.tolist(), "scores": scores.tolist(), "persona_ids": personas.tolist(),
                    "complete": True}
        results = []
        for u in range(len(q2)):
            n = int((scores[u] > -np.inf).sum())
            results.append({"ids": ids[u, :n].tolist(), "scores": scores[u, :n].tolist(),
                            "persona_ids": personas[u, :n].tolist()})
        return {"results": results, "k": k, "complete": True}

    async def _check_known(self, budget: float, ids: list) -> None:
        routed = route_candidates(ids, self.n_shards)
        answers = await self._fan(budget, "unknown_ids", {s: ([ids[p] for p in routed[s]],)
                                                  for s in range(self.n_shards) if routed[s]})
        routed_ids = {p for r in routed for p in r}
        bad = [x for s in sorted(answers) for x in answers[s]] + [ids[p] for p in range(len(ids)) if p not in routed_ids]
        if bad:
            raise UnknownItemError(f"{len(bad)} allow ids not in the index (or removed), e.g. {bad[:5]!r}: "
                                   "pass unknown='skip' to drop them")

    async def rerank(self, body: dict) -> dict:
        budget = self._budget(body)
        q, single = check_user_vectors(np.asarray(body.get("user"), dtype=np.float32), self.dim)
        if not single:
            raise _BadRequest("rerank takes one user vector ('user')")
        cand = body.get("candidates")
        if not isinstance(cand, list):
            raise _BadRequest("'candidates' must be a list of item ids")
        unknown = body.get("unknown", "error")
        if unknown not in ("error", "skip"):
            raise _BadRequest("unknown must be 'error' or 'skip'")
        routed = route_candidates(cand, self.n_shards)
        results = await self._fan(budget, "persona_scores", {s: (q, [cand[p] for p in routed[s]], unknown)
                                                     for s in range(self.n_shards) if routed[s]})
        res = fuse_rerank(cand, routed, results, body.get("base_scores"), float(body.get("alpha", 1.0)), unknown)
        return {"ids": list(res.ids), "scores": res.scores.tolist(), "persona_scores": res.persona_scores.tolist(),
                "persona_ids": res.persona_ids, "complete": True}

    async def explain(self, body: dict) -> dict:
        q, single = check_user_vectors(np.asarray(body.get("user"), dtype=np.float32), self.dim)
        if not single:
            raise _BadRequest("explain takes one user vector ('user')")
        item_id = body.get("item_id")
        try:
            s = shard_of(item_id, self.n_shards)
        except TypeError:
            raise UnknownItemError(f"item {item_id!r} is not in the index") from None
        personas = await self._call(self._budget(body), s, "explain", q, item_id)
        return {"item_id": item_id, "personas": personas, "complete": True}

    async def health(self, budget: float | None = None) -> dict:
        budget = budget or self.retry_deadline_s
        infos = await self._fan(budget, "info", {s: () for s in range(self.n_shards)})
        return {"status": "ok", "n_shards": self.n_shards, "dim": self.dim, "id_kind": self.id_kind,
                "encoder": self.encoder, "shards": [infos[s] for s in range(self.n_shards)]}

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request) -> Any:
        from starlette.responses import JSONResponse

        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        handlers = {"search": self.search, "rerank": self.rerank, "explain": self.explain}
        try:
            if route == "health" and request.method == "GET":
                return JSONResponse(await self.health())
            if route not in handlers or request.method != "POST":
                return JSONResponse({"error": f"unknown endpoint {request.method} {request.url.path}: use POST "
                                              "/search, /rerank, /explain or GET /health"}, status_code=404)
            try:
                body = json.loads(await request.body())
            except json.JSONDecodeError as e:
                raise _BadRequest(f"the request body is not JSON: {e}") from e
            if not isinstance(body, dict):
                raise _BadRequest("the request body must be a JSON object")
            return JSONResponse(await handlers[route](body))
        except ShardUnavailableError as e:
            return JSONResponse({"error": str(e), "complete": False}, status_code=503)
        except UnknownItemError as e:
            return JSONResponse({"error": str(e), "kind": "unknown_item"}, status_code=404)
        except (ValueError, TypeError) as e:  # bad input: say what is wrong
            return JSONResponse({"error": str(e), "kind": "bad_request"}, status_code=400)


def build_app(index_dir: str | Path, *, replicas_per_shard: int = 1, shard_resources: list[str] | None = None,
              shard_cpus: float = 0.0, retry_deadline_s: float = 10.0, verify: bool = True,
              health_check_period_s: float = 2.0):
    """The Serve application for a sharded index directory.

    ``shard_resources``: custom Ray resource names; shard ``s`` asks for a sliver of
    ``shard_resources[s % len]``, so shards land on the nodes that advertise them.
    ``shard_cpus``: CPUs Ray reserves per shard replica (0 lets the OS share cores; set it
    on a real cluster so Ray spreads replicas by load).
    """
    index_dir = str(Path(index_dir).resolve())
    meta = read_manifest(index_dir)
    if replicas_per_shard < 1:
        raise ValueError(f"replicas_per_shard must be at least 1, got {replicas_per_shard}")
    shards = []
    for s in range(meta["n_shards"]):
        actor_options: dict[str, Any] = {"num_cpus": shard_cpus}
        if shard_resources:
            actor_options["resources"] = {shard_resources[s % len(shard_resources)]: 0.001}
        # .options() is added by @serve.deployment
        shards.append(ShardServer.options(  # type: ignore[attr-defined]
            name=f"shard-{s}", num_replicas=replicas_per_shard, ray_actor_options=actor_options,
            health_check_period_s=health_check_period_s, health_check_timeout_s=max(5.0, health_check_period_s),
        ).bind(index_dir, s, verify))
    router = Router.options(name="router", ray_actor_options={"num_cpus": 0})  # type: ignore[attr-defined]
    return router.bind(index_dir, retry_deadline_s, *shards)


def start(index_dir: str | Path, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          num_cpus: int | None = None, **app_options) -> str:
    """Deploy the index on Ray Serve and return its base URL. Without ``address`` an embedded
    local Ray is started (``ray.init``); with one, the existing cluster is joined."""
    if not ray.is_initialized():
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    serve.run(build_app(index_dir, **app_options), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Remove the application and shut Serve and this process's Ray connection down."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
