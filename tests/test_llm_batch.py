"""`--mode batch` end to end against a loopback fake of the OpenAI Batch API (issue 13, item 7)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from llm_fixtures.batch_fake import BatchFake  # noqa: E402
from llm_fixtures.stub_server import Reply, StubServer, chat_reply  # noqa: E402

from persona4rec.llm.client import ClientConfig, FatalLLMError  # noqa: E402
from persona4rec.llm.jobs import read_jsonl  # noqa: E402
from persona4rec.llm.prompts import load_prompt_set  # noqa: E402
from persona4rec.llm.stages import run_tasks, summary_tasks  # noqa: E402

PROMPTS = load_prompt_set("product")
GOOD = json.dumps({"summary": "A guitar strap. It is made of leather."})
DEADLINE_S = 30
FAST_POLL = {"poll_initial_s": 0.01, "poll_max_s": 0.03}


def items(n: int) -> list[dict]:
    return [{"item_id": f"I{i:03d}", "title": f"Item number {i}", "categories": "Straps", "description": "",
             "attributes": {}} for i in range(n)]


def item_of(body: dict) -> str:
    text = body["messages"][1]["content"]
    return "I" + text.split("Item number ", 1)[1].split("\n", 1)[0].zfill(3)


def run(server: StubServer, out: Path, n: int = 5, mode: str = "batch", cache: Path | None = None,
        deadline_s: float | None = None, **cfg):
    settings = dict(base_url=server.base_url, model="stub", api_key_env=None, timeout_s=2.0, max_retries=2,
                    backoff_base_s=0.01, backoff_cap_s=0.02)
    settings.update(cfg)
    go = run_tasks(summary_tasks(items(n), PROMPTS), ClientConfig(**settings), out, "summary", PROMPTS,
                   cache or out.with_name(out.name + ".cache.jsonl"), deadline_s=deadline_s, mode=mode,
                   batch_options=FAST_POLL)
    return asyncio.run(asyncio.wait_for(go, DEADLINE_S))


COMPARED = ("key", "status", "summary", "item_id", "item_title", "usage", "calls", "repaired", "prompt_version",
            "stage_prompt_fingerprint", "model")


def test_batch_mode_writes_the_same_records_and_cache_entries_as_online_mode(tmp_path):
    # I002's first answer is broken: its repair turn goes out in a second batch.
    def responder(body, n):
        if item_of(body) == "I002" and len(body["messages"]) == 2:
            return chat_reply('{"summary": "cut')
        return chat_reply(GOOD, prompt_tokens=1000, completion_tokens=100)

    with StubServer(responder) as s:
        fake = BatchFake(s, responder)
        batch = run(s, tmp_path / "batch.jsonl")
        online = run(s, tmp_path / "online.jsonl", mode="online")
        assert len(s.requests) == 6  # the online run paid for its own answers (separate cache)
        # the online run's cache and the batch run's cache hold the same keys
        replay = run(s, tmp_path / "again.jsonl", mode="online", cache=tmp_path / "batch.jsonl.cache.jsonl")
        assert len(s.requests) == 6 and replay.cached == 5
    assert [len(json.loads(fake.files[b["input_file_id"]].decode().splitlines()[0])["body"]["messages"])
            for b in fake.created] == [2, 4]  # first turns, then the repair turn
    by_batch = {r["key"]: r for r in read_jsonl(tmp_path / "batch.jsonl")}
    by_online = {r["key"]: r for r in read_jsonl(tmp_path / "online.jsonl")}
    assert sorted(by_batch) == sorted(by_online) == [f"I{i:03d}" for i in range(5)]
    for key in by_batch:
        assert {k: by_batch[key].get(k) for k in COMPARED} == {k: by_online[key].get(k) for k in COMPARED}
    assert by_batch["I002"]["repaired"] and by_batch["I002"]["attempts"][0]["batch_id"] == "batch_0"
    assert batch.mode == "batch" and batch.prompt_tokens == online.prompt_tokens
    prices = {"prompt": 0.15, "completion": 0.6}
    assert batch.cost(prices) == pytest.approx(online.cost(prices) / 2)
    assert "at batch prices" in batch.format(prices)


def test_failed_lines_are_sent_again_in_the_next_batch(tmp_path):
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        fake = BatchFake(s, lambda b, n: chat_reply(GOOD), fail_lines=frozenset({1, 3}))
        summary = run(s, tmp_path / "out.jsonl")
    records = read_jsonl(tmp_path / "out.jsonl")
    assert summary.done == 5 and all(r["status"] == "ok" for r in records)
    assert len(fake.created) == 2 and len(fake.files[fake.created[1]["input_file_id"]].decode().splitlines()) == 2
    retried = [r for r in records if len(r["attempts"]) == 2]
    assert len(retried) == 2 and all(r["attempts"][0]["status"] == 500 for r in retried)


def test_an_expired_batch_keeps_its_answers_and_requeues_the_rest(tmp_path):
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        fake = BatchFake(s, lambda b, n: chat_reply(GOOD), expire_after=2)
        summary = run(s, tmp_path / "out.jsonl")
    assert summary.done == 5 and len(fake.lines_answered) == 5  # 2 in the expired batch, 3 in the next
    assert [b["status"] for b in fake.created] == ["expired", "completed"]
    state = json.loads((tmp_path / "out.jsonl.batch.json").read_text())
    assert [b["status"] for b in state["batches"]] == ["expired", "completed"]


def test_a_failed_batch_is_resubmitted_and_rejected_lines_fail_their_record(tmp_path):
    def responder(body, n):
        return Reply(400, {"error": {"message": "bad request"}}) if item_of(body) == "I001" else chat_reply(GOOD)

    with StubServer(responder) as s:
        fake = BatchFake(s, responder, fail_batch=True)
        summary = run(s, tmp_path / "out.jsonl")
    records = {r["key"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert [b["status"] for b in fake.created] == ["failed", "completed"]
    assert records["I001"]["status"] == "failed" and "HTTP 400" in records["I001"]["error"]
    assert summary.failed == 1 and summary.done == 5


def test_a_run_stopped_while_its_batch_is_in_flight_resumes_from_the_batch_id(tmp_path):
    out = tmp_path / "out.jsonl"
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        fake = BatchFake(s, lambda b, n: chat_reply(GOOD), hold=True)
        stopped = run(s, out, deadline_s=0.5)  # stands in for a kill: the batch stays in flight
        assert stopped.pending == 5 and stopped.stopped == "deadline"
        assert not out.exists() or read_jsonl(out) == []
        assert len(fake.created) == 1 and json.loads((tmp_path / "out.jsonl.batch.json").read_text())[
            "batches"][0]["id"] == "batch_0"
        fake.release()
        resumed = run(s, out)
    assert resumed.done == 5 and len(fake.created) == 1  # polled the same batch, submitted nothing new
    assert len(fake.lines_answered) == 5 and sorted(r["key"] for r in read_jsonl(out)) == [
        f"I{i:03d}" for i in range(5)]


def test_a_quota_error_on_upload_stops_the_run(tmp_path):
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        s.routes["POST /v1/files"] = lambda *a: Reply(429, {"error": {"code": "insufficient_quota",
                                                                       "message": "You exceeded your current quota"}})
        with pytest.raises(FatalLLMError, match="quota"):
            run(s, tmp_path / "out.jsonl")


def test_cli_batch_run_killed_mid_batch_resumes_the_same_batch(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    items_path = tmp_path / "items.jsonl"
    items_path.write_text("".join(json.dumps(i) + "\n" for i in items(4)))
    out = tmp_path / "out.jsonl"
    state = tmp_path / "out.jsonl.batch.json"
    command = [sys.executable, "-m", "persona4rec.cli", "llm", "summaries", "--items", str(items_path), "--out",
               str(out), "--mode", "batch", "--batch-poll", "0.02", "--batch-poll-max", "0.05", "--no-progress",
               "--api-key-env", "P4R_NO_KEY", "--timeout", "5", "--prices", '{"prompt": 0.2, "completion": 0.8}']
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        fake = BatchFake(s, lambda b, n: chat_reply(GOOD), hold=True)
        proc = subprocess.Popen(command + ["--base-url", s.base_url], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline and not state.exists():
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(10)
            proc.stderr.close()
        assert len(fake.created) == 1
        fake.release()
        finished = subprocess.run(command + ["--base-url", s.base_url], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert len(fake.created) == 1 and len(fake.lines_answered) == 4
    assert "tokens paid (batch): prompt 44" in finished.stderr and "at batch prices" in finished.stderr
    assert sorted(r["key"] for r in read_jsonl(out)) == [f"I{i:03d}" for i in range(4)]


def test_a_round_larger_than_the_batch_limit_is_split(tmp_path):
    settings = dict(model="stub", api_key_env=None, timeout_s=2.0, max_retries=2, backoff_base_s=0.01)
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        fake = BatchFake(s, lambda b, n: chat_reply(GOOD))
        go = run_tasks(summary_tasks(items(5), PROMPTS), ClientConfig(base_url=s.base_url, **settings),
                       tmp_path / "out.jsonl", "summary", PROMPTS, mode="batch",
                       batch_options={**FAST_POLL, "max_batch_requests": 2})
        summary = asyncio.run(asyncio.wait_for(go, DEADLINE_S))
    assert summary.done == 5
    assert [len(fake.files[b["input_file_id"]].decode().splitlines()) for b in fake.created] == [2, 2, 1]
