"""The offline persona pipeline on Ray Data: `persona4rec pipeline run CONFIG.toml [--address ADDR]`.

Stages: aspects -> summaries -> personas (-> the judge's selection when training pairs are wanted)
-> encoding of the persona texts -> a :class:`~persona4rec.ShardedPersonaIndex`. Each LLM stage
builds its tasks with the same functions as `persona4rec llm` (:mod:`persona4rec.llm.stages`) and
runs them with the same :class:`~persona4rec.llm.jobs.JobRunner` and httpx
:class:`~persona4rec.llm.client.ChatClient`, inside a Ray Data actor pool.

Exactly-once on a cluster
-------------------------
Tasks are split into ``partitions`` by a stable hash of their key. A partition is one Ray Data
row, and one actor runs it at a time, with the JobRunner's own guarantees on that partition's
files under ``out/<stage>/``: one JSON line per finished task, flushed at once, torn last lines
cut on restart, finished keys skipped, and every paid answer in the partition's content-hash
cache before its record is written. The files sit on storage every worker sees (``out`` must be
a shared path on a multi-node cluster). A killed and restarted pipeline therefore loses nothing,
duplicates nothing, and pays again only for the requests that were in flight.

Requests in flight are bounded twice: each actor's ChatClient has ``concurrency`` connections,
and a named Ray actor (one per endpoint URL) leases at most ``max_in_flight`` slots over the whole
cluster (per partition, not per request: see :class:`InFlightLimiter`).

Configuration (TOML; relative paths are relative to the config file)::

    [data]
    reviews = "reviews.jsonl.gz"        # Amazon 5-core or normalised review fields
    items = "items.csv"                  # optional item metadata
    exclude_review_ids = "held_out.txt"  # the leakage guard: exactly one of exclude_review_ids,
    # split = "loo"                      #   split (+ dataset, data_dir, split_tie_break, split_seed)
    # allow_heldout = true               #   or allow_heldout (production personas only)
    domain = "product"
    limit_items = 30                     # optional: only the first N item ids (sorted)

    [endpoint]
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"
    concurrency = 8                      # connections per actor
    max_in_flight = 32                   # requests in flight over the whole cluster
    # temperature, max_tokens, seed, response_format, timeout, max_retries, rpm, tpm, prices = {...}

    [run]
    out = "pipeline-out"
    stages = ["aspects", "summaries", "personas"]   # add "select" for the judge's training pairs
    actors = 2                           # LLM actor pool size
    partitions = 16                      # fixed for the life of `out` (the caches are per partition)
    actor_resources = {}                 # custom Ray resources per LLM actor, e.g. {"llm_node" = 1}: one per node

    [encoder]
    model_dir = "..."                    # optional; default: the project's default encoder
    actors = 1
    batch_size = 64
    num_gpus = 0                         # > 0: CUDA provider (install the [gpu] extra)

    [index]
    n_shards = 4                         # written to out/index
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona4rec.scale import require_ray

STAGE_ORDER = ("aspects", "summaries", "personas", "select")
# The JobRunner's stage names (they key the prompt fingerprints and the records).
RUNNER_STAGE = {"aspects": "aspects", "summaries": "summary", "personas": "personas", "select": "selection"}


class PipelineStopped(RuntimeError):
    """The endpoint refused the run as a whole (bad key, no quota): finished records are kept."""


class PipelineConfigError(ValueError):
    """A pipeline configuration that cannot run; the message names the key and what to write."""


# --------------------------------------------------------------------------- configuration
@dataclass
class PipelineConfig:
    reviews: Path
    out: Path
    items: Path | None = None
    guard: dict[str, Any] = field(default_factory=dict)
    domain: str = "product"
    prompt_version: str | None = None
    limit_items: int | None = None
    endpoint: dict[str, Any] = field(default_factory=dict)
    max_in_flight: int = 32
    prices: dict[str, float] | None = None
    stages: tuple[str, ...] = ("aspects", "summaries", "personas")
    actors: int = 2
    partitions: int = 16
    actor_resources: dict[str, float] = field(default_factory=dict)
    max_reviews_per_item: int = 40
    review_text_tokens: int = 256
    history_size: int = 10
    targets_per_user: int = 1
    like_threshold: float = 4.0
    encoder_dir: Path | None = None
    encoder_actors: int = 1
    encoder_batch_size: int = 64
    encoder_gpus: float = 0.0
    encode: bool = True
    n_shards: int = 4

    @classmethod
    def from_toml(cls, path: str | Path) -> "PipelineConfig":
        import tomllib

        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise PipelineConfigError(f"{path}: no such configuration file") from None
        except tomllib.TOMLDecodeError as e:
            raise PipelineConfigError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(raw, base=path.parent)

    @classmethod
    def from_dict(cls, raw: dict, base: Path = Path(".")) -> "PipelineConfig":
        known = {"data", "endpoint", "run", "encoder", "index"}
        unknown = set(raw) - known
        if unknown:
            raise PipelineConfigError(f"unknown section(s) {sorted(unknown)}; the sections are {sorted(known)}")
        data, endpoint = dict(raw.get("data", {})), dict(raw.get("endpoint", {}))
        run, enc, index = dict(raw.get("run", {})), dict(raw.get("encoder", {})), dict(raw.get("index", {}))

        def path_of(section: dict, key: str, where: str, required: bool = False) -> Path | None:
            value = section.pop(key, None)
            if value is None:
                if required:
                    raise PipelineConfigError(f"[{where}] {key} is required")
                return None
            p = Path(value)
            return p if p.is_absolute() else (base / p)

        reviews = path_of(data, "reviews", "data", required=True)
        items = path_of(data, "items", "data")
        guard = {k: data.pop(k) for k in ("exclude_review_ids", "split", "dataset", "data_dir", "split_tie_break",
                                          "split_seed", "allow_heldout") if k in data}
        if "exclude_review_ids" in guard:
            guard["exclude_review_ids"] = str(path_of({"x": guard["exclude_review_ids"]}, "x", "data"))
        cfg = cls(reviews=reviews, out=path_of(run, "out", "run", required=True), items=items, guard=guard)  # type: ignore[arg-type]
        cfg.domain = str(data.pop("domain", cfg.domain))
        cfg.prompt_version = data.pop("prompt_version", None)
        cfg.limit_items = data.pop("limit_items", None)
        cfg.max_in_flight = int(endpoint.pop("max_in_flight", cfg.max_in_flight))
        cfg.prices = endpoint.pop("prices", None)
        cfg.endpoint = endpoint
        stages = tuple(run.pop("stages", cfg.stages))
        bad = [s for s in stages if s not in STAGE_ORDER]
        if bad:
            raise PipelineConfigError(f"[run] stages: unknown {bad}; choose from {list(STAGE_ORDER)}")
        cfg.stages = tuple(s for s in STAGE_ORDER if s in stages)
        for key in ("actors", "partitions", "max_reviews_per_item", "review_text_tokens", "history_size",
                    "targets_per_user"):
            if key in run:
                setattr(cfg, key, int(run.pop(key)))
        resources = run.pop("actor_resources", {})
        if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) for v in resources.values()):
            raise PipelineConfigError("[run] actor_resources must be a table of resource name = amount")
        cfg.actor_resources = {str(k): float(v) for k, v in resources.items()}
        if "like_threshold" in run:
            cfg.like_threshold = float(run.pop("like_threshold"))
        cfg.encoder_dir = path_of(enc, "model_dir", "encoder")
        cfg.encoder_actors = int(enc.pop("actors", cfg.encoder_actors))
        cfg.encoder_batch_size = int(enc.pop("batch_size", cfg.encoder_batch_size))
        cfg.encoder_gpus = float(enc.pop("num_gpus", cfg.encoder_gpus))
        cfg.encode = bool(enc.pop("enabled", True))
        cfg.n_shards = int(index.pop("n_shards", cfg.n_shards))
        for name, section in (("data", data), ("run", run), ("encoder", enc), ("index", index)):
            if section:
                raise PipelineConfigError(f"[{name}] unknown key(s) {sorted(section)}")
        for name, value in (("[run] actors", cfg.actors), ("[run] partitions", cfg.partitions),
                            ("[endpoint] max_in_flight", cfg.max_in_flight), ("[index] n_shards", cfg.n_shards),
                            ("[encoder] actors", cfg.encoder_actors), ("[encoder] batch_size", cfg.encoder_batch_size)):
            if value < 1:
                raise PipelineConfigError(f"{name} must be at least 1, got {value}")
        cfg.client_config()  # fail now on bad endpoint keys
        return cfg

    def client_config(self):
        from persona4rec.llm.client import ClientConfig

        e = dict(self.endpoint)
        renames = {"timeout": "timeout_s", "rpm": "requests_per_minute", "tpm": "tokens_per_minute"}
        e = {renames.get(k, k): v for k, v in e.items()}
        if e.get("api_key_env") == "":
            e["api_key_env"] = None
        try:
            return ClientConfig(**e)
        except TypeError as exc:
            raise PipelineConfigError(f"[endpoint]: {exc} (keys: base_url, model, api_key_env, temperature, "
                                      "max_tokens, seed, extra_body, response_format, timeout, concurrency, "
                                      "max_retries, rpm, tpm, max_in_flight, prices)") from None

    def guard_namespace(self) -> argparse.Namespace:
        """The leakage-guard options as `persona4rec llm` reads them (one function decides for both)."""
        g = self.guard
        return argparse.Namespace(
            exclude_review_ids=g.get("exclude_review_ids"), split=g.get("split"),
            dataset=g.get("dataset", "amazon-mi-5core"), data_dir=g.get("data_dir"),
            split_tie_break=g.get("split_tie_break", "random"), split_seed=int(g.get("split_seed", 0)),
            allow_heldout=bool(g.get("allow_heldout", False)))


# --------------------------------------------------------------------------- partitions
def partition_of(key: str, partitions: int) -> int:
    """Stable partition of a task key (the same in every process and run)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") % partitions


def _part_name(part: int) -> str:
    return f"part-{part:05d}"


def read_stage_records(stage_dir: Path) -> list[dict[str, Any]]:
    """Every record of a stage, from all its partition files, sorted by key."""
    from persona4rec.llm.jobs import read_jsonl

    records: list[dict[str, Any]] = []
    for p in sorted(stage_dir.glob("part-*.jsonl")):
        if p.name.endswith(".cache.jsonl"):
            continue
        records += read_jsonl(p)
    return sorted(records, key=lambda r: r["key"])


# --------------------------------------------------------------------------- Ray pieces
class InFlightLimiter:
    """Cluster-wide request slots for one endpoint (a named async Ray actor).

    Workers lease several slots at once for a whole partition (one call to take them, one to give
    them back) instead of one call per request: two actor calls per request cost more CPU than the
    requests themselves. The sum of leases never exceeds ``limit``, so neither do the requests."""

    def __init__(self, limit: int):
        self.limit = limit
        self.free = limit
        self.peak = 0
        self.leases = 0
        self._changed = asyncio.Condition()

    async def lease(self, want: int) -> int:
        """Wait for at least one free slot, then take up to ``want``; returns how many were taken."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0)
            got = min(want, self.free)
            self.free -= got
            self.leases += 1
            self.peak = max(self.peak, self.limit - self.free)
            return got

    async def give_back(self, n: int) -> None:
        async with self._changed:
            self.free += n
            self._changed.notify_all()

    def stats(self) -> dict[str, int]:
        return {"limit": self.limit, "leased_now": self.limit - self.free, "peak": self.peak, "leases": self.leases}


class _LimitedClient:
    """A ChatClient bounded to the slots its worker leased; the JobRunner sees a ChatClient."""

    def __init__(self, client, slots: int):
        self._client = client
        self._slots = asyncio.Semaphore(slots)

    @property
    def config(self):
        return self._client.config

    @property
    def response_format(self):
        return self._client.response_format

    async def complete(self, messages, schema=None, stage="chat"):
        async with self._slots:
            return await self._client.complete(messages, schema, stage)


class StageWorker:
    """Ray Data actor: runs whole partitions of one stage's tasks through the JobRunner."""

    def __init__(self, stage: str, client_config: dict, domain: str, prompt_version: str, stage_dir: str,
                 limiter_name: str, namespace: str | None):
        import ray

        from persona4rec.llm.client import ClientConfig
        from persona4rec.llm.prompts import load_prompt_set

        self.stage = stage
        self.config = ClientConfig(**client_config)
        self.prompts = load_prompt_set(domain, prompt_version)
        self.stage_dir = Path(stage_dir)
        self.limiter = ray.get_actor(limiter_name, namespace=namespace)

    def __call__(self, batch: dict) -> dict:
        import cloudpickle

        from persona4rec.llm.client import FatalLLMError

        summaries = []
        for part, blob in zip(batch["part"], batch["tasks"]):
            tasks = cloudpickle.loads(bytes(blob))
            try:
                summary = asyncio.run(self._run(int(part), tasks)).as_dict()
            except FatalLLMError as exc:  # reported as data: the driver stops the run with this reason
                partial = getattr(exc, "summary", None)
                summary = {**(partial.as_dict() if partial is not None else {}), "fatal": str(exc)}
            summaries.append(json.dumps(summary))
        return {"part": batch["part"], "summary": summaries}

    async def _run(self, part: int, tasks: list):
        from persona4rec.llm.client import ChatClient
        from persona4rec.llm.jobs import JobRunner

        runner_stage = RUNNER_STAGE[self.stage]
        slots = await self.limiter.lease.remote(self.config.concurrency)
        try:
            async with ChatClient(self.config) as client:
                runner = JobRunner(_LimitedClient(client, slots), runner_stage, self.prompts.tag,  # type: ignore[arg-type]
                                   self.prompts.fingerprint, self.stage_dir / f"{_part_name(part)}.cache.jsonl",
                                   progress=False, stage_fingerprint=self.prompts.stage_fingerprint(runner_stage))
                return await runner.run(tasks, self.stage_dir / f"{_part_name(part)}.jsonl")
        finally:
            await self.limiter.give_back.remote(slots)


class EncodeWorker:
    """Ray Data actor: persona texts -> L2-normalised vectors with ONNX Runtime (CUDA when given GPUs)."""

    def __init__(self, model_dir: str | None, use_gpu: bool):
        from persona4rec.default_model import load_default_encoder

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_gpu else ["CPUExecutionProvider"]
        self.encoder = load_default_encoder(model_dir=model_dir, providers=providers, intra_op_threads=0,
                                            export_if_missing=model_dir is None)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        vectors = np.asarray(self.encoder.encode(list(batch["text"])), dtype=np.float32)
        return {"row": batch["row"], "vector": list(vectors)}


# --------------------------------------------------------------------------- the pipeline
@dataclass
class PipelineResult:
    stage_summaries: dict[str, dict[str, Any]]
    index_dir: Path | None
    n_items: int
    n_personas: int
    limiter: dict[str, int]
    seconds: float

    @property
    def pending(self) -> int:
        return sum(int(s.get("pending", 0)) for s in self.stage_summaries.values())


def _check_state(cfg: PipelineConfig) -> None:
    """The partitioning of ``out`` is fixed at its first run: a different count would orphan the caches."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    state = cfg.out / "pipeline_state.json"
    if state.exists():
        saved = json.loads(state.read_text("utf-8"))
        if saved.get("partitions") != cfg.partitions:
            raise PipelineConfigError(
                f"{cfg.out} was written with partitions = {saved.get('partitions')}; this config says "
                f"{cfg.partitions}. Use the same number (the response caches are per partition) or a new [run] out")
    else:
        tmp = state.with_name(state.name + ".tmp")
        tmp.write_text(json.dumps({"partitions": cfg.partitions}))
        tmp.replace(state)


def build_stage_tasks(cfg: PipelineConfig, stage: str, prompts, reviews: list, items: dict, excluded: set,
                      guard: str | None) -> list:
    """The tasks of one stage, built exactly as `persona4rec llm <stage>` builds them."""
    from persona4rec.llm import stages

    if stage == "aspects":
        tasks = stages.aspect_tasks(reviews, prompts, items, excluded)
    elif stage == "summaries":
        chosen = sorted({r["item_id"] for r in reviews})
        tasks = stages.summary_tasks([items[i] for i in chosen if i in items], prompts)
    elif stage == "personas":
        summaries = stages.summaries_from_records(read_stage_records(cfg.out / "summaries"))
        tasks = stages.persona_tasks(read_stage_records(cfg.out / "aspects"), prompts, summaries, items, excluded,
                                     cfg.max_reviews_per_item, reviews, cfg.review_text_tokens)
    else:
        summaries = stages.summaries_from_records(read_stage_records(cfg.out / "summaries"))
        requests = stages.selection_requests(reviews, excluded, cfg.history_size, cfg.targets_per_user)
        tasks = stages.selection_tasks(requests, read_stage_records(cfg.out / "personas"), prompts, summaries, items,
                                       cfg.like_threshold, read_stage_records(cfg.out / "aspects"))
    if guard is not None and stage != "summaries":
        for task in tasks:
            task.meta["leakage_guard"] = guard
    return tasks


def load_inputs(cfg: PipelineConfig) -> tuple[list, dict, set, str | None]:
    """(reviews, items, excluded review ids, guard description), with the leakage guard enforced."""
    from persona4rec.llm import inputs
    from persona4rec.llm.guard import leakage_guard

    excluded, guard = leakage_guard(cfg.guard_namespace())
    reviews = inputs.load_reviews(cfg.reviews)
    items = inputs.load_items(cfg.items) if cfg.items else {}
    if cfg.limit_items is not None:
        keep = set(sorted({r["item_id"] for r in reviews})[: cfg.limit_items])
        reviews = [r for r in reviews if r["item_id"] in keep]
    return reviews, items, excluded, guard


def run_pipeline(cfg: PipelineConfig, *, address: str | None = None, log=print) -> PipelineResult:
    """Run every configured stage on Ray (embedded local Ray without ``address``)."""
    ray = require_ray()
    import cloudpickle

    from persona4rec.llm.prompts import DEFAULT_PROMPT_VERSION, load_prompt_set

    started = time.perf_counter()
    _check_state(cfg)
    prompts = load_prompt_set(cfg.domain, cfg.prompt_version or DEFAULT_PROMPT_VERSION)
    reviews, items, excluded, guard = load_inputs(cfg)
    client_config = cfg.client_config()
    own_ray = not ray.is_initialized()
    if own_ray:
        if address is None:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    summaries: dict[str, dict[str, Any]] = {}
    limiter_stats: dict[str, int] = {}
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        namespace = ray.get_runtime_context().namespace
        endpoint_id = hashlib.blake2b(client_config.base_url.encode(), digest_size=6).hexdigest()
        limiter_name = f"persona4rec-inflight-{endpoint_id}"
        limiter = ray.remote(InFlightLimiter).options(
            name=limiter_name, get_if_exists=True, num_cpus=0, max_concurrency=10_000).remote(cfg.max_in_flight)
        config_dict = {k: v for k, v in client_config.__dict__.items()}
        for stage in cfg.stages:
            tasks = build_stage_tasks(cfg, stage, prompts, reviews, items, excluded, guard)
            stage_dir = cfg.out / stage
            stage_dir.mkdir(parents=True, exist_ok=True)
            parts: dict[int, list] = {}
            for t in tasks:
                parts.setdefault(partition_of(t.key, cfg.partitions), []).append(t)
            rows = [{"part": p, "tasks": cloudpickle.dumps(parts[p])} for p in sorted(parts)]
            t0 = time.perf_counter()
            total = _empty_summary(stage, len(tasks))
            if rows:
                ds = ray.data.from_items(rows, override_num_blocks=len(rows))
                extra = {"resources": cfg.actor_resources} if cfg.actor_resources else {}
                out = ds.map_batches(
                    StageWorker, batch_size=1, concurrency=min(cfg.actors, len(rows)), num_cpus=0.5, **extra,
                    fn_constructor_kwargs=dict(stage=stage, client_config=config_dict, domain=cfg.domain,
                                               prompt_version=prompts.version, stage_dir=str(stage_dir),
                                               limiter_name=limiter_name, namespace=namespace))
                for row in out.take_all():
                    part_summary = json.loads(row["summary"])
                    _add_summary(total, part_summary)
                    if part_summary.get("fatal"):
                        total.setdefault("fatal", part_summary["fatal"])
            total["seconds"] = round(time.perf_counter() - t0, 3)
            if cfg.prices:
                from persona4rec.llm.jobs import RunSummary

                rs = RunSummary(RUNNER_STAGE[stage], prompt_tokens=total["prompt_tokens"],
                                completion_tokens=total["completion_tokens"])
                total["estimated_cost_usd"] = round(rs.cost(cfg.prices) or 0.0, 6)
            summaries[stage] = total
            log(f"{stage}: {len(tasks)} tasks in {len(rows)} partitions; {total['done']} done "
                f"({total['cached']} from cache), {total['already_done']} already recorded, {total['failed']} failed, "
                f"{total['pending']} pending; tokens paid: prompt {total['prompt_tokens']}, completion "
                f"{total['completion_tokens']}; {total['seconds']} s")
            if total.get("fatal"):
                raise PipelineStopped(f"{stage}: the endpoint refused the run: {total['fatal']} (tokens paid so far: "
                                      f"prompt {total['prompt_tokens']}, completion {total['completion_tokens']})")
            if total["pending"]:
                log(f"{stage}: {total['pending']} tasks still pending after transient errors; rerun the same command "
                    "(finished work is kept)")
                break
        limiter_stats = ray.get(limiter.stats.remote())
        index_dir, n_items, n_personas = None, 0, 0
        if cfg.encode and "personas" in cfg.stages and not any(s["pending"] for s in summaries.values()):
            index_dir, n_items, n_personas = _encode_and_index(cfg, log)
    finally:
        if own_ray:
            ray.shutdown()
    result = PipelineResult(summaries, index_dir, n_items, n_personas, limiter_stats,
                            round(time.perf_counter() - started, 3))
    (cfg.out / "pipeline_summary.json").write_text(json.dumps(
        {"stages": summaries, "index": str(index_dir) if index_dir else None, "n_items": n_items,
         "n_personas": n_personas, "in_flight_limiter": limiter_stats, "seconds": result.seconds}, indent=1))
    return result


def _empty_summary(stage: str, total: int) -> dict[str, Any]:
    return {"stage": stage, "total": total, "already_done": 0, "done": 0, "cached": 0, "retried": 0, "failed": 0,
            "pending": 0, "failed_total": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "cached_prompt_tokens": 0, "cached_completion_tokens": 0}


def _add_summary(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("already_done", "done", "cached", "retried", "failed", "pending", "failed_total", "prompt_tokens",
                "completion_tokens", "cached_prompt_tokens", "cached_completion_tokens"):
        total[key] += int(part.get(key, 0))


def persona_catalog(records: list[dict[str, Any]]) -> tuple[list[str], list[str], list[int], list[dict[str, str]]]:
    """(item ids, persona texts, CSR offsets, persona records) from the personas stage, items sorted by id.

    Texts are what the evaluation embeds (:func:`persona4rec.personas.persona_text`)."""
    from persona4rec.personas import persona_text

    item_ids: list[str] = []
    texts: list[str] = []
    offsets = [0]
    records_out: list[dict[str, str]] = []
    for r in sorted((r for r in records if r.get("status") == "ok"), key=lambda r: str(r["item_id"])):
        personas = r.get("personas") or []
        if not personas:
            continue
        item_ids.append(str(r["item_id"]))
        for k, p in enumerate(personas):
            row = {"persona_id": str(p.get("persona_id") or f"{r['item_id']}_{p.get('ID', f'P{k + 1}')}"),
                   "name": str(p.get("Name", "")).strip(), "description": str(p.get("Description", "")).strip(),
                   "rationale": str(p.get("Preference_Rationale", "")).strip()}
            records_out.append(row)
            texts.append(persona_text(row))
        offsets.append(len(texts))
    return item_ids, texts, offsets, records_out


def _encode_and_index(cfg: PipelineConfig, log) -> tuple[Path, int, int]:
    import numpy as np
    import ray.data

    from persona4rec.default_model import load_default_encoder
    from persona4rec.sharded import ShardedPersonaIndex

    item_ids, texts, offsets, personas = persona_catalog(read_stage_records(cfg.out / "personas"))
    t0 = time.perf_counter()
    use_gpu = cfg.encoder_gpus > 0
    model_dir = str(cfg.encoder_dir) if cfg.encoder_dir else None
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)],
                             override_num_blocks=max(1, min(len(texts), cfg.encoder_actors * 4)))
    options: dict[str, Any] = {"num_gpus": cfg.encoder_gpus} if use_gpu else {"num_cpus": 1}
    encoded = ds.map_batches(EncodeWorker, batch_size=cfg.encoder_batch_size, concurrency=cfg.encoder_actors,
                             fn_constructor_kwargs={"model_dir": model_dir, "use_gpu": use_gpu}, **options)
    dim = None
    vectors = None
    for row in encoded.iter_rows():
        v = np.asarray(row["vector"], dtype=np.float32)
        if vectors is None:
            dim = len(v)
            vectors = np.zeros((len(texts), dim), dtype=np.float32)
        vectors[int(row["row"])] = v
    seconds = time.perf_counter() - t0
    identity = load_default_encoder(model_dir=model_dir, export_if_missing=model_dir is None).identity
    if vectors is None:
        vectors = np.zeros((0, int(identity.get("dim", 1))), dtype=np.float32)
    index_dir = cfg.out / "index"
    ShardedPersonaIndex.build(item_ids, vectors, np.asarray(offsets, dtype=np.int64), personas, n_shards=cfg.n_shards,
                              encoder=identity, path=index_dir)
    log(f"encoded {len(texts)} persona texts in {seconds:.1f} s ({len(texts) / max(seconds, 1e-9):.1f} texts/s, "
        f"{'GPU' if use_gpu else 'CPU'}); wrote {index_dir} ({len(item_ids)} items, {cfg.n_shards} shards)")
    return index_dir, len(item_ids), len(texts)


# --------------------------------------------------------------------------- command line
def _root_cause(exc: BaseException) -> BaseException:
    """The error raised in user code, under Ray's wrappers (RayTaskError -> UserCodeException -> ...)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc



def main(config_path: str, *, address: str | None = None) -> int:
    """`persona4rec pipeline run`: 0 done, 1 tasks pending (rerun), 2 bad configuration or input."""
    try:
        cfg = PipelineConfig.from_toml(config_path)
    except (PipelineConfigError, ValueError) as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 2
    try:
        result = run_pipeline(cfg, address=address, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (PipelineConfigError, ValueError, OSError) as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 2
    except PipelineStopped as e:
        print(f"pipeline: stopped: {e}\nfinished records are kept; fix the cause and rerun the same command",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. a fatal endpoint error (bad key, no quota) raised in an actor
        cause = _root_cause(e)
        lines = [line for line in str(cause).splitlines() if line.strip()]
        print(f"pipeline: stopped: {type(cause).__name__}: {lines[0] if lines else ''}\nfinished records are kept; "
              "fix the cause and rerun the same command", file=sys.stderr)
        return 2
    print(json.dumps({"index": str(result.index_dir) if result.index_dir else None, "n_items": result.n_items,
                      "n_personas": result.n_personas, "pending": result.pending, "seconds": result.seconds}))
    return 1 if result.pending else 0
