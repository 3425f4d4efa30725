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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
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
