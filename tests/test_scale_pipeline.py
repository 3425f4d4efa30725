"""The offline pipeline on Ray Data against the loopback LLM stub, on a real local Ray (127.0.0.1):
the same records and the same index as the single-process stages, and kill -9 of the driver mid-run
followed by a rerun loses and duplicates nothing and pays again at most the requests in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("httpx")
pytest.importorskip("onnxruntime")

from scale_helpers import LOOPBACK_ENV, ScriptedLLM, loopback_ray, review_subset, users  # noqa: E402

from persona4rec import PersonaIndex, ShardedPersonaIndex  # noqa: E402
from persona4rec.llm.jobs import read_jsonl  # noqa: E402

ray = loopback_ray()
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY_ENCODER = ROOT / "tests" / "encoder_fixtures" / "tiny_model"
COMPARED = ("key", "status", "item_id", "review_id", "review_ids", "aspects", "summary", "personas",
            "user_id", "target_item_id", "selected_persona_id", "reasoning", "leakage_guard")


def _config(tmp_path: Path, base_url: str, reviews: Path, held_out: Path, items: Path, **run) -> Path:
    run = {"stages": ["aspects", "summaries", "personas"], **run}
    run_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in run.items())
    text = f"""
[data]
reviews = "{reviews}"
items = "{items}"
exclude_review_ids = "{held_out}"
domain = "product"

[endpoint]
base_url = "{base_url}"
model = "stub"
api_key_env = ""
concurrency = 4
max_in_flight = 6
timeout = 10
max_retries = 2

[run]
out = "{tmp_path / 'out'}"
{run_lines}

[encoder]
model_dir = "{TINY_ENCODER}"
batch_size = 16

[index]
n_shards = 3
"""
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture()
def mi_reviews(shared_dir, tmp_path):
    reviews = tmp_path / "reviews.jsonl"
    items, held = review_subset(shared_dir, reviews, n_items=30)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(held) + "\n")
    return reviews, held_out, items, shared_dir / "data" / "amazon-mi-5core" / "items.csv"


def _single_process(tmp_path: Path, base_url: str, reviews: Path, held_out: Path, items_path: Path):
    """The same stages run by persona4rec.llm in this process, and the index built from their personas."""
    import asyncio

    from persona4rec import load_default_encoder  # the public name: stable across the encoder refactor
    from persona4rec.llm import stages
    from persona4rec.llm.client import ClientConfig
    from persona4rec.llm.inputs import load_items, load_reviews
    from persona4rec.llm.prompts import load_prompt_set
    from persona4rec.scale.pipeline import persona_catalog

    prompts = load_prompt_set("product")
    excluded = set(held_out.read_text().split())
    guard = f"exclude-review-ids {held_out.name} ({len(excluded)} ids)"
    revs = load_reviews(reviews)
    cfg = ClientConfig(base_url=base_url, model="stub", api_key_env=None, concurrency=4, timeout_s=10, max_retries=2)
    out = tmp_path / "single"
    out.mkdir()

    def run(tasks, name, stage):
        asyncio.run(stages.run_tasks(tasks, cfg, out / f"{name}.jsonl", stage, prompts, out / f"{name}.cache"))
        return read_jsonl(out / f"{name}.jsonl")

    all_items = load_items(items_path)
    aspect_tasks = stages.aspect_tasks(revs, prompts, all_items, excluded)
    for t in aspect_tasks:
        t.meta["leakage_guard"] = guard
    aspects = run(aspect_tasks, "aspects", "aspects")
    chosen = sorted({r["item_id"] for r in revs})
    summaries = run(stages.summary_tasks([all_items[i] for i in chosen], prompts), "summaries", "summary")
    persona_tasks = stages.persona_tasks(aspects, prompts, stages.summaries_from_records(summaries), all_items,
                                         excluded, reviews=revs)
    for t in persona_tasks:
        t.meta["leakage_guard"] = guard
    personas = run(persona_tasks, "personas", "personas")
    requests = stages.selection_requests(revs, excluded, 10, 1)
    selection_tasks = stages.selection_tasks(requests, personas, prompts, stages.summaries_from_records(summaries),
                                             all_items, 4.0, aspects)
    for t in selection_tasks:
        t.meta["leakage_guard"] = guard
    selection = run(selection_tasks, "select", "selection")
    ids, texts, offsets, records = persona_catalog(personas)
    encoder = load_default_encoder(model_dir=TINY_ENCODER, export_if_missing=False)
    index = PersonaIndex.build(ids, encoder.encode(texts), np.asarray(offsets), records, encoder=encoder)
    return {"aspects": aspects, "summaries": summaries, "personas": personas, "select": selection}, index


def _comparable(records):
    return sorted(({k: r.get(k) for k in COMPARED} for r in records), key=lambda r: r["key"])


def test_pipeline_matches_the_single_process_stages(local_ray, mi_reviews, tmp_path):
    from llm_fixtures.stub_server import StubServer

    from persona4rec.scale.pipeline import PipelineConfig, read_stage_records, run_pipeline

    reviews, held_out, items, items_path = mi_reviews
    with StubServer(ScriptedLLM()) as server:
        cfg = PipelineConfig.from_toml(_config(tmp_path, server.base_url, reviews, held_out, items_path, actors=2,
                                               partitions=6, stages=["aspects", "summaries", "personas", "select"]))
        result = run_pipeline(cfg, log=lambda m: None)
        in_flight_peak = server.max_in_flight
        single_records, single_index = _single_process(tmp_path, server.base_url, reviews, held_out, items_path)
    assert result.pending == 0 and result.index_dir is not None
    for stage in ("aspects", "summaries", "personas", "select"):
        distributed = read_stage_records(cfg.out / stage)
        assert len({r["key"] for r in distributed}) == len(distributed) > 0
        assert _comparable(distributed) == _comparable(single_records[stage]), stage
    assert {r["item_id"] for r in single_records["personas"]} == set(items)
    assert 0 < in_flight_peak <= 6 and result.limiter["peak"] <= 6
    sharded = ShardedPersonaIndex.load(result.index_dir)
    assert sharded.item_ids == single_index.item_ids and sharded.n_personas == single_index.n_personas
    assert sharded.encoder_identity == single_index.encoder_identity
    q = users(10, dim=single_index.dim)
    a, b = single_index.search(q, 10, return_personas=True), sharded.search(q, 10, return_personas=True)
    assert a[0].tolist() == b[0].tolist() and a[2].tolist() == b[2].tolist()
    np.testing.assert_array_equal(a[1], b[1])


def _session_members(session_id: int) -> list[int]:
    """Live processes (not zombies) of one session: what a kill of the driver's process group left."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session_id:  # state, ppid, pgrp, session
            found.append(int(entry.name))
    return found


def _lines(stage_dir: Path) -> int:
    return sum(p.read_text().count("\n") for p in stage_dir.glob("part-*.jsonl") if ".cache" not in p.name)


def test_killed_driver_then_rerun_loses_and_duplicates_nothing(mi_reviews, tmp_path):
    """kill -9 the pipeline's driver (and its embedded Ray) mid-stage, rerun: every task has one
    record, and no more requests were paid twice than were in flight."""
    from llm_fixtures.stub_server import StubServer

    reviews, held_out, _, items_path = mi_reviews
    llm = ScriptedLLM(delay_s=0.15)
    env = {**os.environ, **LOOPBACK_ENV}
    with StubServer(llm) as server:
        config = _config(tmp_path, server.base_url, reviews, held_out, items_path, actors=2, partitions=6)
        cmd = [sys.executable, "-m", "persona4rec.cli", "pipeline", "run", str(config)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while _lines(tmp_path / "out" / "aspects") < 20 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert proc.poll() is None, "the pipeline ended before it could be killed"
            assert _lines(tmp_path / "out" / "aspects") >= 20
        finally:
            killed_at_lines = _lines(tmp_path / "out" / "aspects")
            # kill -9 the driver and, at the same moment, every Ray process it started (its session):
            # the embedded cluster dies with the driver, workers' requests in flight are cut
            for pid in [proc.pid] + _session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=60)
            for _ in range(50):  # SIGKILLed processes take a moment to go; never leave one behind
                survivors = _session_members(proc.pid)
                if not survivors:
                    break
                for pid in survivors:
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
        before = len(llm.sent)
        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        peak = server.max_in_flight
    from persona4rec.scale.pipeline import read_stage_records

    out = tmp_path / "out"
    for stage in ("aspects", "summaries", "personas"):
        records = read_stage_records(out / stage)
        keys = [r["key"] for r in records]
        assert len(keys) == len(set(keys)), f"{stage}: duplicated records"
        assert all(r["status"] == "ok" for r in records)
    excluded = set(held_out.read_text().split())
    from persona4rec.llm.inputs import load_reviews

    expected = {r["review_id"] for r in load_reviews(reviews)
                if r["review_id"] not in excluded and (r["text"].strip() or r["title"].strip())}
    assert {r["review_id"] for r in read_stage_records(out / "aspects")} == expected, "records lost"
    print(f"killed after {killed_at_lines} aspect records; requests sent {sum(llm.sent.values())}, distinct "
          f"{len(llm.sent)}, paid twice {llm.paid_twice}; stub peak in flight {peak}")
    assert before > 0 and llm.paid_twice <= 6, (llm.paid_twice, "more requests paid twice than the in-flight limit")
    assert peak <= 6
    assert ShardedPersonaIndex.load(out / "index").n_items == len(read_stage_records(out / "personas"))


def test_fatal_endpoint_error_stops_with_a_message(local_ray, mi_reviews, tmp_path, capsys):
    """A rejected key (401) stops the run with exit status 2 and a one-line reason, not a traceback."""
    from llm_fixtures.stub_server import Reply, StubServer

    from persona4rec.scale.pipeline import main

    reviews, held_out, _, items_path = mi_reviews
    with StubServer(lambda body, n: Reply(401, {"error": {"message": "Incorrect API key provided"}})) as server:
        status = main(str(_config(tmp_path, server.base_url, reviews, held_out, items_path, actors=1, partitions=2)))
    err = capsys.readouterr().err
    assert status == 2 and "pipeline: stopped:" in err and "401" in err and "Traceback" not in err, err[-2000:]
