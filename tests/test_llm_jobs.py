"""JobRunner: repair turn, failure records, cache, resume after a kill, pending tasks, fatal stops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from llm_fixtures.stub_server import (  # noqa: E402
    Reply,
    StubServer,
    chat_reply,
    chat_reply_without_usage,
    quota_reply,
)

from persona4rec.llm.client import ChatClient, ClientConfig, FatalLLMError  # noqa: E402
from persona4rec.llm.jobs import JobRunner, read_jsonl  # noqa: E402
from persona4rec.llm.prompts import load_prompt_set  # noqa: E402
from persona4rec.llm.stages import selection_tasks, summary_tasks  # noqa: E402

PROMPTS = load_prompt_set("product")
DEADLINE_S = 30
GOOD = json.dumps({"summary": "A guitar strap. It is made of leather."})


def items(n: int) -> list[dict]:
    return [{"item_id": f"I{i:03d}", "title": f"Item number {i}", "categories": "Straps", "description": "",
             "attributes": {"price": "9.99"}} for i in range(n)]


def item_of(body: dict) -> str:
    """The item id a summary request is about (from its rendered prompt)."""
    text = body["messages"][1]["content"]
    return "I" + text.split("Item number ", 1)[1].split("\n", 1)[0].zfill(3)


def run(server: StubServer, tasks, out: Path, cache: Path | None = None, retry_failed: bool = False,
        deadline_s: float | None = None, stage: str = "summary", **cfg):
    settings = dict(base_url=server.base_url, model="stub", api_key_env=None, timeout_s=2.0, concurrency=4,
                    max_retries=2, backoff_base_s=0.01, backoff_cap_s=0.02)
    settings.update(cfg)

    async def go():
        async with ChatClient(ClientConfig(**settings)) as client:
            runner = JobRunner(client, stage, PROMPTS.tag, PROMPTS.fingerprint, cache, progress=False,
                               deadline_s=deadline_s)
            return await runner.run(tasks, out, retry_failed=retry_failed)

    return asyncio.run(asyncio.wait_for(go(), DEADLINE_S))


def test_malformed_json_gets_one_repair_turn_quoting_the_error(tmp_path):
    with StubServer(lambda b, n: chat_reply('{"summary": "cut off' if n == 0 else GOOD)) as s:
        summary = run(s, summary_tasks(items(1), PROMPTS), tmp_path / "out.jsonl")
    [record] = read_jsonl(tmp_path / "out.jsonl")
    assert record["status"] == "ok" and record["repaired"] is True and record["calls"] == 2
    assert record["summary"] == "A guitar strap. It is made of leather."
    repair_turn = s.requests[1]["messages"]
    assert repair_turn[-2] == {"role": "assistant", "content": '{"summary": "cut off'}
    assert "not valid JSON" in repair_turn[-1]["content"]
    assert record["usage"] == {"prompt_tokens": 22, "completion_tokens": 14}  # both calls counted
    assert summary.done == 1 and summary.failed == 0


def test_schema_failure_twice_is_recorded_as_failed_with_raw_text(tmp_path):
    bad = [json.dumps({"summary": ""}), json.dumps({"sumary": "typo"})]
    with StubServer(lambda b, n: chat_reply(bad[n % 2])) as s:
        summary = run(s, summary_tasks(items(1), PROMPTS), tmp_path / "out.jsonl")
    [record] = read_jsonl(tmp_path / "out.jsonl")
    assert record["status"] == "failed" and "summary" not in record
    assert record["raw_text"] == bad
    assert "must not be empty" in record["errors"][0] and "missing required field" in record["error"]
    assert len(s.requests) == 2 and summary.failed == 1
    assert record["prompt_version"] == "v2/product" and record["model"] == "stub"


def test_failed_records_are_kept_on_resume_and_redone_only_on_request(tmp_path):
    out = tmp_path / "out.jsonl"
    tasks = summary_tasks(items(3), PROMPTS)
    with StubServer(lambda b, n: chat_reply("{}" if item_of(b) == "I001" else GOOD)) as s:
        run(s, tasks, out)
        assert run(s, tasks, out).done == 0  # failed I001 is not silently retried
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        summary = run(s, tasks, out, retry_failed=True)
    records = read_jsonl(out)
    assert summary.done == 1 and len(s.requests) == 1
    assert sorted(r["key"] for r in records) == ["I000", "I001", "I002"]
    assert all(r["status"] == "ok" for r in records)


def test_cache_answers_repeated_calls_without_the_server(tmp_path):
    cache = tmp_path / "cache.jsonl"
    tasks = summary_tasks(items(5), PROMPTS)
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        first = run(s, tasks, tmp_path / "a.jsonl", cache)
        second = run(s, tasks, tmp_path / "b.jsonl", cache)
    assert len(s.requests) == 5
    assert first.cached == 0 and second.cached == 5 and second.prompt_tokens == 0
    assert second.cached_prompt_tokens == first.prompt_tokens == 55
    assert all(r["cached"] for r in read_jsonl(tmp_path / "b.jsonl"))


def test_cache_key_changes_with_model_and_params(tmp_path):
    cache = tmp_path / "cache.jsonl"
    tasks = summary_tasks(items(1), PROMPTS)
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        run(s, tasks, tmp_path / "a.jsonl", cache)
        run(s, tasks, tmp_path / "b.jsonl", cache, temperature=0.7)
        run(s, tasks, tmp_path / "c.jsonl", cache, model="other")
    assert len(s.requests) == 3


def test_resume_skips_recorded_keys_and_cuts_a_torn_line(tmp_path):
    out = tmp_path / "out.jsonl"
    tasks = summary_tasks(items(6), PROMPTS)
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        run(s, tasks[:3], out)
        with open(out, "a") as f:
            f.write('{"key": "I003", "status": "o')  # a kill landed mid-write
        summary = run(s, tasks, out)
    records = read_jsonl(out)
    assert summary.already_done == 3 and summary.done == 3
    assert sorted(r["key"] for r in records) == [f"I{i:03d}" for i in range(6)]
    assert out.read_text().count("\n") == 6


def test_transient_failures_leave_tasks_pending_for_the_next_run(tmp_path):
    out = tmp_path / "out.jsonl"
    tasks = summary_tasks(items(4), PROMPTS)
    with StubServer(lambda b, n: Reply(503, "overloaded") if item_of(b) == "I002" else chat_reply(GOOD)) as s:
        summary = run(s, tasks, out)
    assert summary.pending == 1 and summary.done == 3 and "I002" in summary.pending_errors[0]
    assert "I002" not in {r["key"] for r in read_jsonl(out)}
    with StubServer(lambda b, n: chat_reply(GOOD)) as s:
        summary = run(s, tasks, out)
    assert summary.done == 1 and summary.pending == 0 and len(read_jsonl(out)) == 4


def test_fatal_error_stops_the_run_and_keeps_finished_records(tmp_path):
    out = tmp_path / "out.jsonl"
    tasks = summary_tasks(items(10), PROMPTS)
    with StubServer(lambda b, n: chat_reply(GOOD) if n < 3 else Reply(401, {"error": {"message": "bad key"}})) as s:
        with pytest.raises(FatalLLMError, match="401"):
            run(s, tasks, out, concurrency=1)
    assert len(read_jsonl(out)) == 3
    assert len(s.requests) == 4  # stopped at the first 401, did not hammer on


def test_retries_and_attempts_are_recorded_per_record(tmp_path):
    with StubServer(lambda b, n: Reply(500, "x") if n == 0 else chat_reply(GOOD)) as s:
        summary = run(s, summary_tasks(items(1), PROMPTS), tmp_path / "out.jsonl")
    [record] = read_jsonl(tmp_path / "out.jsonl")
    assert [a.get("status") for a in record["attempts"]] == [500, 200]
    assert summary.retried == 1


def test_cost_estimate_uses_paid_tokens(tmp_path):
    with StubServer(lambda b, n: chat_reply(GOOD, prompt_tokens=1000, completion_tokens=500)) as s:
        summary = run(s, summary_tasks(items(2), PROMPTS), tmp_path / "out.jsonl")
    assert summary.cost({"prompt": 0.15, "completion": 0.6}) == pytest.approx((2000 * 0.15 + 1000 * 0.6) / 1e6)
    assert "estimated cost" in summary.format({"prompt": 0.15, "completion": 0.6})


def test_killed_cli_run_resumes_with_exactly_one_record_per_input(tmp_path):
    n_items = 40
    items_path = tmp_path / "items.jsonl"
    items_path.write_text("".join(json.dumps(i) + "\n" for i in items(n_items)))
    out = tmp_path / "summaries.jsonl"
    command = [sys.executable, "-m", "persona4rec.cli", "llm", "summaries", "--items", str(items_path),
               "--out", str(out), "--concurrency", "2", "--no-progress", "--api-key-env", "P4R_NO_KEY",
               "--timeout", "5"]
    with StubServer(lambda b, n: chat_reply(GOOD, delay_s=0.05)) as s:
        proc = subprocess.Popen(command + ["--base-url", s.base_url], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(10)
            proc.stderr.close()
        written_before_kill = len(read_jsonl(out))
        assert 8 <= written_before_kill < n_items
        finished = subprocess.run(command + ["--base-url", s.base_url], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    keys = [r["key"] for r in read_jsonl(out)]
    assert sorted(keys) == sorted(i["item_id"] for i in items(n_items))  # nothing lost, nothing duplicated
    # Answers that arrived before the kill came from the cache; at most the calls in flight were paid twice.
    assert len(s.requests) <= n_items + 2


# ------------------------------------------------------------------ issue 13: hostile answers and stops

def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona4rec.cli", "llm", *args, "--no-progress",
                           "--api-key-env", "P4R_NO_KEY", "--timeout", "5", "--max-retries", "1"],
                          capture_output=True, text=True, timeout=timeout)


def write_items(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items(n)))
    return path


def test_fenced_summary_after_a_preamble_is_stored_as_its_json_value(tmp_path):
    answer = 'Here is the summary.\n```json\n' + GOOD + '\n```'
    with StubServer(lambda b, n: chat_reply(answer)) as s:
        run(s, summary_tasks(items(2), PROMPTS), tmp_path / "out.jsonl")
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["summary"] for r in records] == ["A guitar strap. It is made of leather."] * 2
    assert all(r["calls"] == 1 for r in records) and len(s.requests) == 2


def persona_record(item_id: str) -> dict:
    return {"item_id": item_id, "status": "ok", "personas": [
        {"persona_id": f"{item_id}_P{k}", "ID": f"P{k}", "Name": f"Name {k}", "Description": "d",
         "Preference_Rationale": "r"} for k in (1, 2)]}


def test_fenced_selection_after_a_preamble_needs_no_repair_and_items_without_personas_fail_loudly(tmp_path):
    requests = [{"user_id": "U1", "target_item_id": "I1", "history": [{"item_id": "I0", "rating": 5.0}]},
                {"user_id": "U2", "target_item_id": "I9", "history": []}]  # I9 has no persona record
    tasks = selection_tasks(requests, [persona_record("I1")], PROMPTS)
    answer = 'My answer:\n```json\n{"reasoning": "The history fits.", "selection": "I1_P2"}\n```'
    with StubServer(lambda b, n: chat_reply(answer)) as s:
        summary = run(s, tasks, tmp_path / "sel.jsonl", stage="selection")
    records = {r["key"]: r for r in read_jsonl(tmp_path / "sel.jsonl")}
    assert records["U1|I1"]["selected_persona_id"] == "I1_P2" and records["U1|I1"]["calls"] == 1
    assert records["U2|I9"]["status"] == "failed" and "no persona" in records["U2|I9"]["error"]
    assert records["U2|I9"]["calls"] == 0 and len(s.requests) == 1
    assert summary.failed_total == 1 and summary.exit_status() == 3 and summary.exit_status(0.5) == 0


def test_answers_without_usage_are_estimated_and_reported(tmp_path):
    with StubServer(lambda b, n: chat_reply_without_usage(GOOD)) as s:
        summary = run(s, summary_tasks(items(3), PROMPTS), tmp_path / "out.jsonl")
    records = read_jsonl(tmp_path / "out.jsonl")
    assert all(r["usage"]["estimated"] and r["usage"]["completion_tokens"] > 0 for r in records)
    assert summary.usage_estimated_calls == 3 and summary.completion_tokens == summary.estimated_completion_tokens > 0
    assert "3 answers came without a usage block" in summary.format()


def test_quota_mid_run_cancels_the_calls_in_flight_and_keeps_the_token_counts(tmp_path):
    out = tmp_path / "out.jsonl"

    def responder(body, n):
        if n < 3:
            return chat_reply(GOOD, prompt_tokens=100, completion_tokens=10)
        if n == 6:
            return quota_reply()
        return chat_reply(GOOD, delay_s=25.0)  # hangs far longer than the test's bound below

    with StubServer(responder) as s:
        with pytest.raises(FatalLLMError, match="quota") as info:
            # Before the fix the stop waited for every request in flight (25 s here): the bound catches that.
            # (timeout_s 30: nothing but the stop may end the hung calls)
            asyncio.run(asyncio.wait_for(asyncio.to_thread(run, s, summary_tasks(items(20), PROMPTS), out,
                                                           concurrency=4, timeout_s=30.0), 10))
        time.sleep(0.2)
        hung_up = s.disconnected_while_waiting
    summary = info.value.summary
    assert summary.done == 3 and summary.prompt_tokens == 300 and summary.pending == 17
    assert summary.stopped.startswith("fatal") and len(read_jsonl(out)) == 3
    assert hung_up == 3  # the three requests in flight were cancelled, not awaited


def test_run_deadline_stops_the_run_and_leaves_the_rest_pending(tmp_path):
    out = tmp_path / "out.jsonl"
    with StubServer(lambda b, n: chat_reply(GOOD) if n < 2 else chat_reply(GOOD, delay_s=25.0)) as s:
        summary = run(s, summary_tasks(items(6), PROMPTS), out, deadline_s=0.5, concurrency=2)
    assert summary.stopped == "deadline" and summary.done == 2 and summary.pending == 4
    assert summary.exit_status() == 1 and len(read_jsonl(out)) == 2


def test_cli_exit_status_says_when_records_failed_and_accepts_a_share_on_request(tmp_path):
    items_path = write_items(tmp_path / "items.jsonl", 4)
    with StubServer(lambda b, n: chat_reply("{}" if item_of(b) == "I001" else GOOD)) as s:
        failed = cli("summaries", "--items", str(items_path), "--out", str(tmp_path / "a.jsonl"), "--base-url",
                     s.base_url)
        allowed = cli("summaries", "--items", str(items_path), "--out", str(tmp_path / "a.jsonl"), "--base-url",
                      s.base_url, "--max-failed-fraction", "0.25")
    assert failed.returncode == 3, failed.stderr
    assert "failed records: 1 of 4" in failed.stderr
    assert allowed.returncode == 0, allowed.stderr


def test_cli_all_records_failed_is_not_success(tmp_path):
    items_path = write_items(tmp_path / "items.jsonl", 3)
    with StubServer(lambda b, n: chat_reply("{}")) as s:
        result = cli("summaries", "--items", str(items_path), "--out", str(tmp_path / "a.jsonl"), "--base-url",
                     s.base_url)
    assert result.returncode == 3 and "failed records: 3 of 3" in result.stderr


def test_cli_quota_stop_prints_tokens_and_cost_so_far(tmp_path):
    items_path = write_items(tmp_path / "items.jsonl", 10)
    with StubServer(lambda b, n: chat_reply(GOOD, prompt_tokens=1000, completion_tokens=100) if n < 2
                    else quota_reply()) as s:
        result = cli("summaries", "--items", str(items_path), "--out", str(tmp_path / "a.jsonl"), "--base-url",
                     s.base_url, "--concurrency", "1", "--prices", '{"prompt": 1.0, "completion": 10.0}')
    assert result.returncode == 2
    assert "quota" in result.stderr and "tokens paid: prompt 2000, completion 200" in result.stderr
    assert "estimated cost: $0.0040" in result.stderr


def test_a_response_format_fallback_is_reported_in_the_summary(tmp_path):
    def responder(body, n):
        if body.get("response_format", {}).get("type") == "json_schema":
            return Reply(400, {"error": {"message": "Unsupported parameter: response_format.json_schema"}})
        return chat_reply(GOOD)

    with StubServer(responder) as s:
        summary = run(s, summary_tasks(items(3), PROMPTS), tmp_path / "out.jsonl", concurrency=1)
    assert summary.done == 3 and summary.failed_total == 0
    assert summary.response_format_fallback == "json_schema -> json_object"
    assert "fell back (json_schema -> json_object)" in summary.format()
    assert len(s.requests) == 4  # one refused request, then three in the simpler format
