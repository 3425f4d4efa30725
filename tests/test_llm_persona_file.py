"""The personas stage's own output, failed records included, loads for `evaluate --personas` (issue 13, D5)."""

from __future__ import annotations

import json
import warnings

import pytest

from persona4rec.personas import load_persona_file


def ok_record(item_id: str) -> dict:
    return {"key": item_id, "stage": "personas", "item_id": item_id, "review_ids": [f"U1:{item_id}"],
            "status": "ok", "personas": [{"persona_id": f"{item_id}_P1", "ID": "P1", "Name": "Budget Player",
                                          "Description": "Wants value.", "Preference_Rationale": "Review 1."}]}


def failed_record(item_id: str) -> dict:
    return {"key": item_id, "stage": "personas", "item_id": item_id, "review_ids": [f"U1:{item_id}"],
            "status": "failed", "error": "$.personas: needs at least 2 items, got 1", "raw_text": ["{}", "{}"]}


def test_failed_records_of_the_pipeline_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "personas.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ok_record("I1"), failed_record("I2"), ok_record("I3")]))
    with pytest.warns(UserWarning, match=r"1 failed persona record\(s\) skipped \(e.g. I2\)"):
        by_item = load_persona_file(str(path))
    assert sorted(by_item) == ["I1", "I3"] and by_item["I1"][0]["name"] == "Budget Player"


def test_an_ok_record_without_personas_is_still_an_error(tmp_path):
    bad = ok_record("I1")
    bad["personas"] = []
    path = tmp_path / "personas.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="personas"):
            load_persona_file(str(path))
