"""Scale-out benchmarks: sharded search in-process, the Ray Serve router's overhead, the Ray Data pipeline.

Run from the repository root (each part can run alone):

    .venv/bin/python benchmarks/bench_scale.py index      # 1,000,000 personas: 4 shards vs one index
    .venv/bin/python benchmarks/bench_scale.py serve      # HTTP through Ray Serve vs in-process sharded search
    .venv/bin/python benchmarks/bench_scale.py pipeline   # Ray Data pipeline vs the single-process job runner
    PERSONA4REC_SHARED=/work/shared .venv/bin/python benchmarks/bench_scale.py cost   # LLM tokens per item

Every row gives wall time and this process's CPU time (``time.process_time``: user + system of all
its threads) side by side, and ratios come from the same run. Timings alternate between the two
sides of a ratio query by query, so a load change on this shared machine hits both sides alike.
The load average before each part is printed.

* ``index``: 200,000 items x 5 personas x d=384 (1,000,000 personas, 384 MB of codes), one
  ``PersonaIndex`` vs a ``ShardedPersonaIndex`` of 4 shards built from the same vectors; exact
  top-10 for single queries and for batches of 16. Results are checked equal before timing.
  Target of the issue: at most 1.1x the CPU per query of one index.
* ``serve``: the same sharded index saved, deployed on an embedded local Ray (127.0.0.1) with one
  replica per shard, queried over HTTP by ``IndexClient``; the overhead is the served latency minus
  the in-process sharded latency of the same queries (p50 and p99). Target: at most 2 ms at p50.
  Ray's own processes are not this process, so the CPU column of served rows is the client's only.
* ``pipeline``: the summaries stage (the stub of tests/llm_fixtures answers every request with a
  valid summary after a fixed delay, in its own process). (a) ``--tasks`` items, ``--concurrency``
  requests in flight in total, 50 ms per answer: the single-process job runner
  (``persona4rec.llm.stages.run_tasks``) vs the Ray Data pipeline on an embedded local Ray (2
  actors, half the concurrency each, the same cluster-wide limit); the pipeline's wall time runs
  from ``run_pipeline`` to its return (actor start-up included; ``ray.init`` reported apart). CPU
  is summed over this process and every process it started (Ray's included), from psutil.
  Target: >= 0.8x the runner's throughput. (b) a simulated 2-node cluster
  (``ray.cluster_utils.Cluster``, both nodes on this machine, one LLM actor per node pinned by a
  custom resource, 4 connections each, 200 ms per answer so that the stub's latency is the
  bottleneck) vs the same run on 1 node. Target: >= 1.6x.
* ``cost``: the pipeline's own token accounting on ``--cost-items`` MI-5core items (their latest
  review held out) against a stub that answers with real gpt-4o-mini outputs of the paper's sample
  (``persona4rec-sample/amazon``: aspects, summaries, personas) and no usage block, so the client
  counts prompt and completion tokens at 4 characters per token; priced at ``--prices``
  (default gpt-4o-mini list prices, USD per 1M tokens) and scaled per item and per review.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _catalog(n_items: int, personas: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n_items * personas, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    offsets = np.arange(0, n_items * personas + 1, personas, dtype=np.int64)
    ids = [f"item-{i}" for i in range(n_items)]
    return ids, vecs, offsets


def _queries(n: int, dim: int, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _time_interleaved(fns: dict, queries: list, repeats: int) -> dict:
    """Wall and CPU seconds per call for each function, calls interleaved query by query."""
    wall = {name: [] for name in fns}
    cpu = {name: 0.0 for name in fns}
    for _ in range(repeats):
        for q in queries:
            for name, fn in fns.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn(q)
                wall[name].append(time.perf_counter() - t0)
                cpu[name] += time.process_time() - c0
    n = repeats * len(queries)
    return {name: (np.asarray(wall[name]), cpu[name] / n) for name in fns}


def _row(label: str, walls: np.ndarray, cpu: float) -> str:
    return (f"| {label} | {np.median(walls) * 1e3:.2f} | {np.percentile(walls, 99) * 1e3:.2f} | "
            f"{cpu * 1e3:.2f} |")


def bench_index(args) -> None:
    from persona4rec import PersonaIndex, ShardedPersonaIndex

    print(f"load average before: {_load()}; cores: {os.cpu_count()}")
    t = time.perf_counter()
    ids, vecs, offsets = _catalog(args.items, args.personas, args.dim)
    single = PersonaIndex.build(ids, vecs, offsets)
    sharded = ShardedPersonaIndex.build(ids, vecs, offsets, n_shards=args.shards)
    del vecs
    print(f"built both ({single.n_personas:,} personas, shards of {sharded.shard_sizes()} items) in "
          f"{time.perf_counter() - t:.1f} s")
    singles = list(_queries(args.queries, args.dim))
    batches = [_queries(16, args.dim, seed=100 + b) for b in range(max(2, args.queries // 8))]
    for q in singles[:5] + batches[:2]:  # equal answers before any timing
        a, b = single.search(q, 10), sharded.search(q, 10)
        assert a[0].tolist() == b[0].tolist() and np.array_equal(a[1], b[1]), "sharded differs from single"
    sharded.search(singles[0], 10)  # warm the thread pool and the ordinal maps
    res1 = _time_interleaved({"single": lambda q: single.search(q, 10),
                              "sharded": lambda q: sharded.search(q, 10)}, singles, args.repeats)
    resb = _time_interleaved({"single": lambda q: single.search(q, 10),
                              "sharded": lambda q: sharded.search(q, 10)}, batches, 1)
    print(f"\nexact top-10 over {single.n_personas:,} personas (d={args.dim}); "
          f"{len(singles) * args.repeats} single queries, {len(batches)} batches of 16\n")
    print("| path | wall p50 ms | wall p99 ms | CPU ms per call |")
    print("|---|---|---|---|")
    print(_row("one PersonaIndex, 1 user", *res1["single"]))
    print(_row(f"{args.shards} shards, 1 user", *res1["sharded"]))
    print(_row("one PersonaIndex, batch of 16", *resb["single"]))
    print(_row(f"{args.shards} shards, batch of 16", *resb["sharded"]))
    cpu1 = res1["sharded"][1] / res1["single"][1]
    cpub = resb["sharded"][1] / resb["single"][1]
    wall1 = np.median(res1["sharded"][0]) / np.median(res1["single"][0])
    wallb = np.median(resb["sharded"][0]) / np.median(resb["single"][0])
    print(f"\nsharded / single CPU per query: {cpu1:.3f} (1 user), {cpub:.3f} (batch of 16); target <= 1.1")
    print(f"sharded / single wall p50: {wall1:.3f} (1 user), {wallb:.3f} (batch of 16) "
          f"with {os.cpu_count()} cores")
    print(f"load average after: {_load()}")
    sharded.close()


def bench_serve(args) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray socket on 127.0.0.1
    from persona4rec import ShardedPersonaIndex
    from persona4rec.scale import serve as served
    from persona4rec.scale.client import IndexClient

    print(f"load average before: {_load()}; cores: {os.cpu_count()}")
    ids, vecs, offsets = _catalog(args.items, args.personas, args.dim)
    with tempfile.TemporaryDirectory() as d:
        sharded = ShardedPersonaIndex.build(ids, vecs, offsets, n_shards=args.shards, path=d)
        del vecs
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
        try:
            t = time.perf_counter()
            url = served.start(d, port=args.port, verify=False)
            print(f"deployed {args.shards} shards in {time.perf_counter() - t:.1f} s at {url}")
            queries = list(_queries(args.queries, args.dim, seed=7))
            with IndexClient(url) as client:
                for q in queries[:5]:
                    a, b = sharded.search(q, 10), client.search(q, 10)
                    assert a[0].tolist() == b[0].tolist() and np.array_equal(a[1], b[1]), "served differs"
                from ray import serve

                handle = serve.get_app_handle(served.APP_NAME)
                res = _time_interleaved({
                    "in-process": lambda q: sharded.search(q, 10),
                    "served": lambda q: client.search(q, 10),
                    "handle": lambda q: handle.search.remote({"user": q.tolist(), "k": 10}).result(),
                }, queries, args.repeats)
        finally:
            served.stop()
    inproc, http = res["in-process"][0], res["served"][0]
    print(f"\nexact top-10 over {args.items * args.personas:,} personas in {args.shards} shards, "
          f"{len(inproc)} queries per path\n")
    print("| path | wall p50 ms | wall p99 ms | CPU ms per call (this process) |")
    print("|---|---|---|---|")
    print(_row("in-process ShardedPersonaIndex", inproc, res["in-process"][1]))
    print(_row("Ray Serve: HTTP -> router -> shards", http, res["served"][1]))
    print(_row("Ray Serve: Python handle -> router -> shards (no HTTP)", res["handle"][0], res["handle"][1]))
    print(f"\nrouter overhead (served - in-process): p50 {(np.median(http) - np.median(inproc)) * 1e3:.2f} ms, "
          f"p99 {(np.percentile(http, 99) - np.percentile(inproc, 99)) * 1e3:.2f} ms; target <= 2 ms at p50")
    handle_walls = res["handle"][0]
    print(f"without HTTP (handle - in-process): p50 {(np.median(handle_walls) - np.median(inproc)) * 1e3:.2f} ms, "
          f"p99 {(np.percentile(handle_walls, 99) - np.percentile(inproc, 99)) * 1e3:.2f} ms")
    print(f"load average after: {_load()}")


def _tree_cpu() -> float:
    """CPU seconds (user + system) of this process and all its live descendants."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _write_inputs(d: Path, n: int) -> tuple[Path, Path]:
    import json

    reviews, items = d / "reviews.jsonl", d / "items.jsonl"
    with open(reviews, "w") as f:
        for i in range(n):
            f.write(json.dumps({"review_id": f"U{i}:I{i}", "user_id": f"U{i}", "item_id": f"I{i}", "rating": 5,
                                "timestamp": i, "title": "ok", "text": "fine"}) + "\n")
    with open(items, "w") as f:
        for i in range(n):
            f.write(json.dumps({"item_id": f"I{i}", "title": f"Item {i}", "categories": "Picks",
                                "description": ""}) + "\n")
    return reviews, items


def _pipeline_config(d: Path, base_url: str, reviews: Path, items: Path, out: str, actors: int, concurrency: int,
                     max_in_flight: int, actor_resources: dict | None = None):
    from persona4rec.scale.pipeline import PipelineConfig

    return PipelineConfig.from_dict({
        "data": {"reviews": str(reviews), "items": str(items), "allow_heldout": True},
        "endpoint": {"base_url": base_url, "model": "stub", "api_key_env": "", "concurrency": concurrency,
                     "max_in_flight": max_in_flight, "max_retries": 0, "timeout": 60},
        "run": {"out": str(d / out), "stages": ["summaries"], "actors": actors, "partitions": 8,
                "actor_resources": actor_resources or {}},
        "encoder": {"enabled": False},
    })


def bench_pipeline(args) -> None:
    import asyncio
    import subprocess

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from persona4rec.llm.client import ClientConfig
    from persona4rec.llm.inputs import load_items
    from persona4rec.llm.prompts import load_prompt_set
    from persona4rec.llm.stages import run_tasks, summary_tasks
    from persona4rec.scale.pipeline import run_pipeline

    stub_path = ROOT / "tests" / "llm_fixtures" / "stub_server.py"

    def start_stub(delay: float):
        proc = subprocess.Popen([sys.executable, str(stub_path), "--delay", str(delay)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        return proc, f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"

    def stop_stub(proc) -> None:
        proc.stdin.close()
        proc.wait(10)

    print(f"load average before: {_load()}; cores: {os.cpu_count()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        reviews, items = _write_inputs(d, args.tasks)
        proc, url = start_stub(0.05)
        try:
            prompts = load_prompt_set("product")
            tasks = summary_tasks(load_items(items).values(), prompts)
            cfg = ClientConfig(base_url=url, model="stub", api_key_env=None, concurrency=args.concurrency,
                               max_retries=0, timeout_s=60)
            c0, t0 = _tree_cpu(), time.perf_counter()
            summary = asyncio.run(run_tasks(tasks, cfg, d / "single.jsonl", "summary", prompts, d / "single.cache"))
            single_wall, single_cpu = time.perf_counter() - t0, _tree_cpu() - c0
            assert summary.done == args.tasks, summary
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
            init_s = time.perf_counter() - t0
            try:
                pcfg = _pipeline_config(d, url, reviews, items, "ray", 2, args.concurrency // 2, args.concurrency)
                c0, t0 = _tree_cpu(), time.perf_counter()
                result = run_pipeline(pcfg, log=lambda m: None)
                ray_wall, ray_cpu = time.perf_counter() - t0, _tree_cpu() - c0
            finally:
                ray.shutdown()
            assert result.stage_summaries["summaries"]["done"] == args.tasks, result.stage_summaries
        finally:
            stop_stub(proc)
        ideal = args.concurrency / 0.05
        rows.append(("single-process job runner", args.tasks, single_wall, single_cpu, ideal))
        rows.append(("Ray Data pipeline, local, 2 actors", args.tasks, ray_wall, ray_cpu, ideal))
        print(f"\n(a) summaries of {args.tasks} items, {args.concurrency} requests in flight, stub 50 ms "
              f"(ideal {ideal:.0f} req/s); ray.init took {init_s:.1f} s (not counted)\n")
        print("| path | wall s | req/s | of ideal | CPU s (all processes) |")
        print("|---|---|---|---|---|")
        for label, n, wall, cpu, ide in rows:
            print(f"| {label} | {wall:.2f} | {n / wall:.0f} | {n / wall / ide:.2f} | {cpu:.2f} |")
        print(f"\npipeline / runner throughput: {single_wall / ray_wall:.2f}; target >= 0.8")

        # (b) 1 node vs 2 nodes, stub latency as the bottleneck
        from ray.cluster_utils import Cluster

        (d / "nodes").mkdir()
        reviews, items = _write_inputs(d / "nodes", args.node_tasks)
        proc, url = start_stub(0.2)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"llm_node": 1}, "object_store_memory": 150 * 2**20, "include_dashboard": False})
        node_rows = []
        try:
            cluster.add_node(num_cpus=1, resources={"llm_node": 1}, object_store_memory=150 * 2**20)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            for n_nodes in (1, 2):
                pcfg = _pipeline_config(d / "nodes", url, reviews, items, f"n{n_nodes}", n_nodes, 4, 64,
                                        {"llm_node": 1})
                c0, t0 = _tree_cpu(), time.perf_counter()
                result = run_pipeline(pcfg, log=lambda m: None)
                node_rows.append((n_nodes, time.perf_counter() - t0, _tree_cpu() - c0))
                assert result.stage_summaries["summaries"]["done"] == args.node_tasks
        finally:
            ray.shutdown()
            cluster.shutdown()
            stop_stub(proc)
    print(f"\n(b) summaries of {args.node_tasks} items, one actor of 4 connections per node, stub 200 ms "
          f"(ideal {4 / 0.2:.0f} req/s per node)\n")
    print("| nodes | wall s | req/s | CPU s (all processes) |")
    print("|---|---|---|---|")
    for n_nodes, wall, cpu in node_rows:
        print(f"| {n_nodes} | {wall:.2f} | {args.node_tasks / wall:.1f} | {cpu:.2f} |")
    print(f"\n2 nodes / 1 node throughput: {node_rows[0][1] / node_rows[1][1]:.2f}; target >= 1.6")
    print(f"load average after: {_load()}")


class SampleAnswers:
    """Stub responder: each stage answered with a real LLM output of the paper's published sample."""

    def __init__(self, shared: Path):
        import gzip
        import json

        from persona4rec.llm.prompts import load_prompt_set

        base = shared / "data" / "persona4rec-sample" / "amazon"

        def rows(name):
            with gzip.open(base / name, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]

        fields = [f["name"] for f in load_prompt_set("product").config["aspects"]]
        self.aspects = []
        for r in rows("1_aspects.jsonl.gz"):
            a = r["extracted_aspects"]
            self.aspects.append({k: a.get(k) or "not stated" for f in fields for k in (f, f + "_reason")})
        self.summaries = [r["item_summary"] for r in rows("2_summary.jsonl.gz")]
        self.personas = [r["personas"] for r in rows("3_personas.jsonl.gz") if len(r["personas"]) >= 2]
        self.n = 0

    def __call__(self, body: dict, n: int):
        import json

        sys.path.insert(0, str(ROOT / "tests"))
        from llm_fixtures.stub_server import chat_reply_without_usage

        self.n += 1
        stage = body["response_format"]["json_schema"]["name"]
        if stage == "aspects":
            answer = self.aspects[self.n % len(self.aspects)]
        elif stage == "summary":
            answer = {"summary": self.summaries[self.n % len(self.summaries)]}
        else:
            personas = self.personas[self.n % len(self.personas)]
            if "exactly 1" in body["messages"][1]["content"]:
                personas = personas[:1]
            answer = {"personas": [{k: p[k] for k in ("Name", "Description", "Preference_Rationale")}
                                   for p in personas[:7]]}
        return chat_reply_without_usage(json.dumps(answer))


def bench_cost(args) -> None:
    import json

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    sys.path.insert(0, str(ROOT / "tests"))
    from llm_fixtures.stub_server import StubServer
    from scale_helpers import review_subset

    from persona4rec.scale.pipeline import PipelineConfig, run_pipeline

    shared = Path(os.environ.get("PERSONA4REC_SHARED", ""))
    if not (shared / "data" / "amazon-mi-5core").is_dir():
        raise SystemExit("set PERSONA4REC_SHARED to the shared data folder")
    prices = json.loads(args.prices)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        items, held = review_subset(shared, d / "reviews.jsonl", n_items=args.cost_items)
        (d / "held_out.txt").write_text("\n".join(held) + "\n")
        n_reviews = sum(1 for _ in open(d / "reviews.jsonl"))
        with StubServer(SampleAnswers(shared)) as server:
            cfg = PipelineConfig.from_dict({
                "data": {"reviews": str(d / "reviews.jsonl"), "exclude_review_ids": str(d / "held_out.txt"),
                         "items": str(shared / "data" / "amazon-mi-5core" / "items.csv")},
                "endpoint": {"base_url": server.base_url, "model": "stub", "api_key_env": "", "concurrency": 8,
                             "max_in_flight": 16, "prices": prices},
                "run": {"out": str(d / "out"), "stages": ["aspects", "summaries", "personas"], "actors": 2,
                        "partitions": 4},
                "encoder": {"enabled": False}})
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
            try:
                result = run_pipeline(cfg, log=lambda m: None)
            finally:
                ray.shutdown()
    print(f"{len(items)} MI-5core items, {n_reviews} reviews ({len(held)} held out); prices {prices} USD per 1M "
          "tokens; tokens counted by the client at 4 characters per token (the stub sends no usage block)\n")
    print("| stage | calls | prompt tokens | completion tokens | cost USD |")
    print("|---|---|---|---|---|")
    total = 0.0
    for stage, s in result.stage_summaries.items():
        cost = s.get("estimated_cost_usd", 0.0)
        total += cost
        print(f"| {stage} | {s['done']} | {s['prompt_tokens']} | {s['completion_tokens']} | {cost:.5f} |")
    per_item = total / len(items)
    print(f"\ntotal ${total:.4f}: ${per_item:.6f} per item at {n_reviews / len(items):.1f} reviews per item; "
          f"10M such items: ${per_item * 1e7:,.0f} (online prices; the Batch API halves it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["index", "serve", "pipeline", "cost"])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--personas", type=int, default=5)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--tasks", type=int, default=3000, help="pipeline: summary tasks for the local comparison")
    parser.add_argument("--concurrency", type=int, default=16, help="pipeline: requests in flight in total")
    parser.add_argument("--node-tasks", type=int, default=400, help="pipeline: tasks of the 1-vs-2-node comparison")
    parser.add_argument("--cost-items", type=int, default=30)
    parser.add_argument("--prices", default='{"prompt": 0.15, "completion": 0.6}')
    args = parser.parse_args()
    if args.part == "index":
        bench_index(args)
    elif args.part == "serve":
        bench_serve(args)
    elif args.part == "pipeline":
        bench_pipeline(args)
    else:
        bench_cost(args)


if __name__ == "__main__":
    main()
