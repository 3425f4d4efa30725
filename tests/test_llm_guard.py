"""Leakage guard (`--exclude-review-ids` / `--split` / `--allow-heldout`), `persona4rec data heldout`,
and per-stage cache invalidation across prompt versions (issue 13, items 4 and 5)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from persona4rec.data.heldout import heldout_review_ids_of_table, review_ids
from persona4rec.data.tables import ReviewTable
from persona4rec.llm.jobs import read_jsonl
from persona4rec.llm.prompts import load_prompt_set


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persona4rec.cli", *args], capture_output=True, text=True,
                          timeout=120)


def reviews_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"reviewerID": f"U{u}", "asin": f"I{i}", "overall": 5.0, "unixReviewTime": 10 * i + u,
             "summary": "ok", "reviewText": f"text {u} {i}"} for u in range(2) for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stages_that_read_reviews_refuse_to_run_without_a_leakage_guard(tmp_path):
    reviews = reviews_file(tmp_path)
    result = cli("llm", "aspects", "--reviews", str(reviews), "--out", str(tmp_path / "a.jsonl"), "--dry-run", "0")
    assert result.returncode == 2
    assert "no leakage guard" in result.stderr and "persona4rec data heldout" in result.stderr
    assert "--allow-heldout" in result.stderr
    both = cli("llm", "aspects", "--reviews", str(reviews), "--out", str(tmp_path / "a.jsonl"), "--dry-run", "0",
               "--allow-heldout", "--split", "loo")
    assert both.returncode == 2 and "only one of" in both.stderr
    allowed = cli("llm", "aspects", "--reviews", str(reviews), "--out", str(tmp_path / "a.jsonl"), "--dry-run", "0",
                  "--allow-heldout")
    assert allowed.returncode == 0, allowed.stderr
    assert "6 tasks" in allowed.stdout


def table(rows: list[tuple[str, str, float]]) -> ReviewTable:
    users, items, times = zip(*rows)
    n = len(rows)
    return ReviewTable.from_columns(list(users), list(items), [5.0] * n, list(times), [""] * n, ["x"] * n,
                                    [{} for _ in range(n)])


def test_heldout_ids_are_each_users_last_two_reviews_after_the_evaluations_cleaning():
    rows = [(u, i, float(10 * k)) for u in ("A", "B", "C") for k, i in enumerate(("X", "Y", "Z", "W"))]
    rows.append(("D", "X", 1.0))  # a user with one review: dropped by the 2-core, never held out
    ids = heldout_review_ids_of_table(table(rows), "loo", "file", 0, k_core_min=2)
    assert ids == {f"{u}:{i}" for u in "ABC" for i in ("Z", "W")}
    assert review_ids(table([("A", "X", 0.0)])) == ["A:X"]  # Amazon ids: reviewerID:asin, as llm.inputs


def test_data_heldout_command_on_mi_5core_matches_the_llm_review_ids(shared_dir, tmp_path):
    from persona4rec.llm.inputs import load_reviews

    out = tmp_path / "held_out.txt"
    result = cli("data", "heldout", "--dataset", "amazon-mi-5core", "--split", "loo", "--out", str(out),
                 "--data-dir", str(shared_dir / "data" / "amazon-mi-5core"))
    assert result.returncode == 0, result.stderr
    ids = [ln for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert len(ids) == len(set(ids)) == 2 * 1429  # validation + test review of every MI-5core user
    llm_ids = {r["review_id"] for r in load_reviews(shared_dir / "data" / "amazon-mi-5core"
                                                    / "reviews_Musical_Instruments_5.json.gz")}
    assert set(ids) <= llm_ids


def test_split_option_excludes_the_held_out_reviews_and_is_recorded(shared_dir, tmp_path):
    pytest.importorskip("httpx")
    from llm_fixtures.stub_server import StubServer

    from persona4rec.data.heldout import heldout_review_ids

    data = shared_dir / "data" / "amazon-mi-5core"
    held_out = heldout_review_ids("amazon-mi-5core", "loo", data_dir=data)
    # a small review file: 6 reviews of the first user with 6+, so 2 of them are held out
    from persona4rec.llm.inputs import load_reviews

    all_reviews = load_reviews(data / "reviews_Musical_Instruments_5.json.gz")
    by_user: dict[str, list] = {}
    for r in all_reviews:
        by_user.setdefault(r["user_id"], []).append(r)
    user, mine = next((u, rs) for u, rs in sorted(by_user.items()) if len(rs) >= 6)
    mine = mine[:6]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mine))
    expected = {r["review_id"] for r in mine} - held_out
    fields = load_prompt_set("product").config["aspects"]
    answer = json.dumps({k: None for f in fields for k in (f["name"], f["name"] + "_reason")})
    from llm_fixtures.stub_server import chat_reply

    with StubServer(lambda b, n: chat_reply(answer)) as s:
        result = cli("llm", "aspects", "--reviews", str(path), "--out", str(tmp_path / "a.jsonl"), "--split", "loo",
                     "--data-dir", str(data), "--base-url", s.base_url, "--api-key-env", "P4R_NO_KEY",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "a.jsonl")
    assert {r["review_id"] for r in records} == expected and len(expected) < 6
    assert all(r["leakage_guard"].startswith("split loo of amazon-mi-5core") for r in records)


def test_a_new_prompt_version_invalidates_only_the_stages_whose_prompts_changed(tmp_path):
    pytest.importorskip("httpx")
    from llm_fixtures.stub_server import StubServer, chat_reply

    from persona4rec.llm.client import ClientConfig
    from persona4rec.llm.stages import aspect_tasks, persona_tasks, run_tasks

    v1, v2 = load_prompt_set("product", "v1"), load_prompt_set("product", "v2")
    assert v1.stage_fingerprint("aspects") == v2.stage_fingerprint("aspects")
    assert v1.stage_fingerprint("personas") != v2.stage_fingerprint("personas")
    review = {"review_id": "U1:I1", "item_id": "I1", "user_id": "U1", "rating": 5.0, "timestamp": 1,
              "title": "Great", "text": "Works on stage."}
    fields = v1.config["aspects"]
    aspects = json.dumps({k: "x" for f in fields for k in (f["name"], f["name"] + "_reason")})
    personas = json.dumps({"personas": [{"Name": "Gigging Stage Player", "Description": "a. b. c.",
                                         "Preference_Rationale": "r"}]})

    def responder(body, n):
        return chat_reply(aspects if body["response_format"]["json_schema"]["name"] == "aspects" else personas)

    cache = tmp_path / "cache.jsonl"
    with StubServer(responder) as s:
        cfg = ClientConfig(base_url=s.base_url, model="stub", api_key_env=None, timeout_s=5)

        def run(tasks, out, stage, prompts):
            return asyncio.run(asyncio.wait_for(run_tasks(tasks, cfg, tmp_path / out, stage, prompts, cache), 30))

        for version, prompts in (("v1", v1), ("v2", v2)):
            run(aspect_tasks([review], prompts), f"aspects-{version}.jsonl", "aspects", prompts)
            records = read_jsonl(tmp_path / f"aspects-{version}.jsonl")
            run(persona_tasks(records, prompts, reviews=[review]), f"personas-{version}.jsonl", "personas", prompts)
    stages = [b["response_format"]["json_schema"]["name"] for b in s.requests]
    assert stages == ["aspects", "personas", "personas"]  # v2's aspects came from the cache
    [aspect_v2] = read_jsonl(tmp_path / "aspects-v2.jsonl")
    assert aspect_v2["cached"] and aspect_v2["prompt_version"] == "v2/product"
    assert aspect_v2["stage_prompt_fingerprint"] == v2.stage_fingerprint("aspects")
