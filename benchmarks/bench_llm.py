"""Throughput of the LLM client and job runner against a local stub that answers after 50 ms.

Run from the repository root:  python benchmarks/bench_llm.py [--requests 2000] [--concurrency 32]

The stub runs in its own process (so its work does not share our interpreter lock) and
answers every request after ``--delay`` seconds. With ``concurrency`` requests in flight
the ideal rate is ``concurrency / delay`` (32 / 0.05 s = 640 req/s). Three paths are timed in
the same run: ``httpx`` (a bare httpx.AsyncClient loop, the baseline), ``client``
(ChatClient.complete: retries, limits, response parsing) and ``runner`` (the whole job path:
parsing, schema validation, cache and JSON-lines writes). The table reports each rate as a
ratio of the ideal and of the bare-httpx baseline, the client CPU time per request, and the
latency added per request on top of the server's delay. A run at delay 0 shows the CPU
ceiling of client plus stub on this machine.

``--hostile`` runs a different check (needs ``PERSONA4REC_SHARED``): the aspects and summaries
stages on a 20-item MI-5core slice through the CLI against a hostile loopback stub (prose before a
fence, 503 with retry-after-ms, trickling bodies, connection resets, no usage block), each stage
killed with SIGKILL ``--kills`` times and resumed; then a quota error in the middle of a run with
slow answers in flight. It prints what a reader of the issue would count: records per task,
duplicates, corrupted summaries, early retries, estimated usage, requests paid twice, and how long
the quota stop took.

Every row reports wall time and this process's CPU time (user + system, from
``time.process_time``) side by side, and the load average before the run, so a figure
taken on a busy machine can be told from one taken on an idle one: a path that used
close to one core of CPU per wall second was CPU-bound, not waiting on the stub.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from persona4rec.llm.client import ChatClient, ClientConfig
from persona4rec.llm.jobs import JobRunner
from persona4rec.llm.prompts import load_prompt_set
from persona4rec.llm.stages import summary_tasks

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "tests" / "llm_fixtures" / "stub_server.py"


def start_stub(delay: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(STUB), "--delay", str(delay)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def stop_stub(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(10)


async def bare_httpx(cfg: ClientConfig, n: int) -> None:
    """Baseline: the same requests with a bare httpx.AsyncClient (no retries, limits or parsing)."""
    import httpx

    body = {"model": cfg.model, "messages": [{"role": "user", "content": "Summarise this item."}],
            "temperature": 0.0, "max_tokens": cfg.max_tokens}
    remaining = iter(range(n))
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=cfg.timeout_s) as http:
        async def worker() -> None:
            for _ in remaining:
                (await http.post(cfg.base_url + "/chat/completions", json=body)).json()

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))


async def client_only(cfg: ClientConfig, n: int) -> None:
    """``concurrency`` workers calling ChatClient.complete back to back."""
    messages = [{"role": "user", "content": "Summarise this item."}]
    remaining = iter(range(n))

    async with ChatClient(cfg) as client:
        async def worker() -> None:
            for _ in remaining:
                await client.complete(messages)

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))


async def full_runner(cfg: ClientConfig, n: int, workdir: Path) -> None:
    """The whole job path: prompt rendering done beforehand, then calls, parsing, cache and JSONL writes."""
    prompts = load_prompt_set("product")
    items = [{"item_id": f"I{i}", "title": f"Item {i}", "categories": "Picks", "description": "",
              "attributes": {}} for i in range(n)]
    tasks = summary_tasks(items, prompts)
    async with ChatClient(cfg) as client:
        runner = JobRunner(client, "summary", prompts.tag, prompts.fingerprint, workdir / "cache.jsonl",
                           progress=False)
        summary = await runner.run(tasks, workdir / "out.jsonl")
    assert summary.done == n and summary.failed == 0, summary


def measure(mode: str, base_url: str, n: int, concurrency: int) -> tuple[float, float]:
    cfg = ClientConfig(base_url=base_url, model="stub", api_key_env=None, concurrency=concurrency,
                       max_retries=0, timeout_s=30)
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if mode == "httpx":
            asyncio.run(bare_httpx(cfg, n))
        elif mode == "client":
            asyncio.run(client_only(cfg, n))
        else:
            asyncio.run(full_runner(cfg, n, Path(tmp)))
        return time.perf_counter() - wall0, time.process_time() - cpu0


class HostileModel:
    """Answers each stage with a valid answer, wrapped in the faults of the issue by request number."""

    RETRY_AFTER_MS = 300

    def __init__(self, aspect_fields: list[dict]):
        self.fields = aspect_fields
        self.kinds: dict[str, int] = {}
        self.answered: dict[str, int] = {}  # request messages -> complete 200 answers sent for them

    def answer(self, body: dict) -> str:
        stage = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if stage == "aspects":
            return json.dumps({k: "value" for f in self.fields for k in (f["name"], f["name"] + "_reason")})
        return json.dumps({"summary": "A neutral summary. It has two sentences."})

    def __call__(self, body: dict, n: int):
        from llm_fixtures.stub_server import Reply, chat_reply, chat_reply_without_usage

        kind = ["prose+fence", "503 retry-after-ms", "trickle", "no usage", "reset", "fenced",
                "ok", "ok", "ok", "ok"][n % 10]
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        answer = self.answer(body)
        if kind in ("prose+fence", "no usage", "fenced", "ok"):
            key = json.dumps(body["messages"], sort_keys=True)
            self.answered[key] = self.answered.get(key, 0) + 1
        if kind == "prose+fence":
            return chat_reply("Here is the JSON you asked for.\n```json\n" + answer + "\n```")
        if kind == "503 retry-after-ms":
            return Reply(503, {"error": {"message": "overloaded"}}, {"retry-after-ms": str(self.RETRY_AFTER_MS)})
        if kind == "trickle":  # 12 pieces 0.15 s apart: 1.8 s, past the 1 s total deadline
            return Reply(200, chat_reply(answer).body, trickle_s=0.15, trickle_chunks=12)
        if kind == "no usage":
            return chat_reply_without_usage(answer)
        if kind == "reset":
            return Reply(reset=True)
        if kind == "fenced":
            return chat_reply("```json\n" + answer + "\n```")
        return chat_reply(answer, delay_s=0.02)


def hostile(kills: int, seed: int) -> int:
    import os
    import random
    import signal

    sys.path.insert(0, str(ROOT / "tests"))
    from llm_fixtures.stub_server import StubServer, chat_reply, quota_reply

    from persona4rec.data.heldout import heldout_review_ids, write_review_ids
    from persona4rec.llm.inputs import load_items, load_reviews
    from persona4rec.llm.jobs import read_jsonl

    shared = os.environ.get("PERSONA4REC_SHARED")
    if not shared:
        print("--hostile needs PERSONA4REC_SHARED (the shared data folder)", file=sys.stderr)
        return 2
    data = Path(shared) / "data" / "amazon-mi-5core"
    rng = random.Random(seed)
    items = load_items(data / "items.csv")
    reviews = load_reviews(data / "reviews_Musical_Instruments_5.json.gz")
    chosen = sorted({r["item_id"] for r in reviews})[:20]
    prompts = load_prompt_set("product")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "items.jsonl").write_text("".join(json.dumps(items[i]) + "\n" for i in chosen))
        (tmp / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews if r["item_id"] in chosen))
        held_out = heldout_review_ids("amazon-mi-5core", "loo", data_dir=data)
        write_review_ids(held_out, tmp / "held_out.txt")
        common = ["--no-progress", "--api-key-env", "P4R_BENCH_NO_KEY", "--timeout", "1", "--max-retries", "8",
                  "--concurrency", "4", "--domain", "product"]
        stages = {
            "aspects": ["aspects", "--reviews", str(tmp / "reviews.jsonl"), "--exclude-review-ids",
                        str(tmp / "held_out.txt")],
            "summaries": ["summaries", "--items", str(tmp / "items.jsonl")],
        }
        model = HostileModel(prompts.config["aspects"])
        print(f"hostile run: 20 MI-5core items, {kills} SIGKILLs per stage, seed {seed}")
        with StubServer(model) as server:
            for name, stage_args in stages.items():
                out = tmp / f"{name}.jsonl"
                command = [sys.executable, "-m", "persona4rec.cli", "llm", *stage_args, "--out", str(out),
                           "--base-url", server.base_url, *common]
                before = len(server.requests)
                for _ in range(kills):
                    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
                    time.sleep(rng.uniform(0.8, 2.5))
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                started = time.perf_counter()
                final = subprocess.run(command, capture_output=True, text=True, timeout=600)
                records = read_jsonl(out)
                keys = [r["key"] for r in records]
                attempts = [a for r in records for a in r["attempts"]]
                early = sum(1 for a in attempts if a.get("status") == 503 and a.get("wait_s", 1e9)
                            < HostileModel.RETRY_AFTER_MS / 1000)
                timeouts = sum(1 for a in attempts if str(a.get("error", "")).startswith("timeout"))
                corrupted = sum(1 for r in records if name == "summaries" and r.get("summary") !=
                                "A neutral summary. It has two sentences.")
                estimated = sum(1 for r in records if r["usage"].get("estimated"))
                sent = len(server.requests) - before
                paid_twice = sum(count - 1 for count in model.answered.values() if count > 1)
                model.answered.clear()
                print(f"  {name}: exit {final.returncode} after the last resume ({time.perf_counter() - started:.1f} s); "
                      f"{len(set(keys))} records for {len(keys)} lines (duplicates {len(keys) - len(set(keys))}); "
                      f"ok {sum(r['status'] == 'ok' for r in records)}, failed "
                      f"{sum(r['status'] == 'failed' for r in records)}; corrupted summaries {corrupted}; "
                      f"503 retries earlier than retry-after-ms {early} of "
                      f"{sum(1 for a in attempts if a.get('status') == 503)}; attempts cut by the total deadline "
                      f"{timeouts}; records with estimated usage {estimated}; HTTP requests {sent}, of which answered "
                      f"in full more than once {paid_twice} (answers in flight at a kill)")

        # A quota error in the middle of a run while slow answers are in flight.
        quota_sent: list[float] = []

        def quota_mid_run(body: dict, n: int):
            if n == 6:
                quota_sent.append(time.perf_counter())
                return quota_reply()
            return chat_reply(model.answer(body), delay_s=0.05 if n < 6 else 60.0)

        with StubServer(quota_mid_run) as server:
            out = tmp / "quota.jsonl"
            command = [sys.executable, "-m", "persona4rec.cli", "llm", *stages["summaries"], "--out", str(out),
                       "--base-url", server.base_url, *common[:-2], "--prices", '{"prompt": 0.15, "completion": 0.6}']
            command[command.index("--timeout") + 1] = "120"
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            ended = time.perf_counter()
        stop_s = ended - quota_sent[0] if quota_sent else float("nan")
        summary_line = next((ln for ln in result.stderr.splitlines() if ln.startswith("tokens paid")), "(none)")
        print(f"  quota mid-run: exit {result.returncode}; process ended {stop_s:.2f} s after the quota answer with "
              f"3 calls in flight that would have taken 60 s; printed: {summary_line!r}; "
              f"{'cost line printed' if 'estimated cost' in result.stderr else 'NO cost line'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--hostile", action="store_true", help="run the hostile-server check instead (see above)")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs per stage in --hostile")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times in --hostile")
    args = parser.parse_args()
    if args.hostile:
        return hostile(args.kills, args.seed)
    ideal = args.concurrency / args.delay
    rows = []
    for delay in (args.delay, 0.0):
        proc, url = start_stub(delay)
        try:
            measure("client", url, 200, args.concurrency)  # warm-up: connections, imports
            for mode in ("httpx", "client", "runner"):
                wall, cpu = measure(mode, url, args.requests, args.concurrency)
                rows.append({"mode": mode, "server_delay_s": delay, "requests": args.requests,
                             "concurrency": args.concurrency, "wall_s": wall, "cpu_s": cpu,
                             "load_average_1min": os.getloadavg()[0], "req_per_s": args.requests / wall,
                             "cpu_ms_per_req": 1000 * cpu / args.requests,
                             "added_latency_ms": 1000 * (wall * args.concurrency / args.requests - delay)})
        finally:
            stop_stub(proc)
    print(f"ideal at {args.delay * 1000:.0f} ms and concurrency {args.concurrency}: {ideal:.0f} req/s; "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':8} {'delay':>6} {'req/s':>8} {'x ideal':>8} {'x httpx':>8} {'wall s':>7} {'CPU s':>6} "
          f"{'CPU/wall':>8} {'client CPU ms/req':>18} {'added ms/req':>13} {'load 1m':>8}")
    for r in rows:
        ratio = f"{r['req_per_s'] / ideal:8.2f}" if r["server_delay_s"] else f"{'-':>8}"
        base = next(b for b in rows if b["mode"] == "httpx" and b["server_delay_s"] == r["server_delay_s"])
        print(f"{r['mode']:8} {r['server_delay_s'] * 1000:4.0f}ms {r['req_per_s']:8.0f} {ratio} "
              f"{r['req_per_s'] / base['req_per_s']:8.2f} {r['wall_s']:7.2f} {r['cpu_s']:6.2f} "
              f"{r['cpu_s'] / r['wall_s']:8.2f} {r['cpu_ms_per_req']:18.3f} {r['added_latency_ms']:13.2f} "
              f"{r['load_average_1min']:8.2f}")
    target = [r for r in rows if r["server_delay_s"] == args.delay and r["mode"] != "httpx"]
    worst = min(r["req_per_s"] for r in target) / ideal
    print(f"target >= 0.70 x ideal: {'met' if worst >= 0.7 else 'NOT met'} (worst path {worst:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
