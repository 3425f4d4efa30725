"""Training pairs: persona-bank pairs, judge-selection parsing, review-grounded labels, agreement."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from persona4rec.train import TrainingPairs, parse_judge_selections, review_grounded_selection, selection_agreement
from persona4rec.train.pairs import judge_field_disagreement, parse_selection, personas_by_item_from_rows, read_jsonl


def _shared_sample() -> Path:
    root = os.environ.get("PERSONA4REC_SHARED")
    if not root:
        pytest.skip("PERSONA4REC_SHARED is not set")
    path = Path(root) / "data" / "persona4rec-sample"
    if not path.is_dir():
        pytest.skip(f"{path} is missing")
    return path


# --- persona-bank pairs -------------------------------------------------------------


def test_from_persona_bank_builds_positives_and_hard_negatives():
    bank = np.arange(6 * 2, dtype=np.float32).reshape(6, 2) + 1.0
    ptr = np.array([0, 3, 4, 6])  # item 0: rows 0-2, item 1: row 3, item 2: rows 4-5
    users = np.ones((3, 2))
    pairs = TrainingPairs.from_persona_bank(users, bank, ptr, [0, 1, 2], [1, 3, 5], user_ids=[7, 8, 9])
    np.testing.assert_array_equal(pairs.positives, bank[[1, 3, 5]])
    assert pairs.hard_negatives.shape == (3, 2, 2)
    np.testing.assert_array_equal(pairs.hard_valid, [[True, True], [False, False], [True, False]])
    np.testing.assert_array_equal(pairs.hard_negatives[0], bank[[0, 2]])
    np.testing.assert_array_equal(pairs.hard_negatives[2, 0], bank[4])
    np.testing.assert_array_equal(pairs.positive_ids, [1, 3, 5])
    np.testing.assert_array_equal(pairs.item_ids, [0, 1, 2])
    sub = pairs.subset([2, 0])
    np.testing.assert_array_equal(sub.user_ids, [9, 7])
    capped = TrainingPairs.from_persona_bank(users, bank, ptr, [0, 1, 2], [1, 3, 5], max_hard_negatives=1)
    assert capped.hard_negatives.shape == (3, 1, 2)


def test_from_persona_bank_rejects_positive_outside_its_item():
    bank = np.ones((4, 2))
    with pytest.raises(ValueError, match="not a persona of item"):
        TrainingPairs.from_persona_bank(np.ones((1, 2)), bank, [0, 2, 4], [0], [3])
    with pytest.raises(ValueError, match="item_ptr"):
        TrainingPairs.from_persona_bank(np.ones((1, 2)), bank, [0, 2, 3], [0], [1])
    with pytest.raises(ValueError, match="integer"):
        TrainingPairs(np.ones((2, 2)), np.ones((2, 2)), user_ids=np.array(["a", "b"]))


# --- judge parsing --------------------------------------------------------------------


def test_reasoning_selection_wins_over_field():
    row = {
        "user_id": "u",
        "target_item_id": "B0X",
        "selected_persona_id": "P1",
        "selection_reasoning": "** fits well.  **Selection:** 3. B0X_P3",
    }
    sel = parse_selection(row)
    assert (sel.persona_id, sel.source, sel.field_persona_id) == ("P3", "reasoning_id", "P1")


def test_earlier_word_selection_does_not_hide_the_final_marker():
    row = {
        "user_id": "u",
        "target_item_id": "it",
        "selected_persona_id": None,
        "selection_reasoning": "This history supports this selection.  Selection: 4. (a persona)",
    }
    sel = parse_selection(row)
    assert (sel.persona_id, sel.source) == ("P4", "reasoning_number")


def test_name_and_field_fallbacks_and_garbage():
    names = {"P1": "The Night Owl", "P2": "Budget Diner"}
    row = {"user_id": "u", "target_item_id": "i", "selection_reasoning": 'Best match: "Budget Diner" clearly.'}
    assert parse_selection(row, names).persona_id == "P2"
    row = {"user_id": "u", "target_item_id": "i", "selected_persona_id": "P2", "selection_reasoning": None}
    assert parse_selection(row).source == "field"
    row = {"user_id": "u", "target_item_id": "i", "selection_reasoning": "no idea"}
    sel = parse_selection(row)
    assert sel.persona_id is None and sel.source == "none"


def test_ids_the_item_does_not_have_fall_back():
    rows = [
        {"user_id": "u", "target_item_id": "i", "selected_persona_id": "P2", "selection_reasoning": "Selection: 9. i_P9"},
        {"user_id": "v", "target_item_id": "i", "selected_persona_id": "P7", "selection_reasoning": "Selection: 9."},
    ]
    sels = parse_judge_selections(rows, {"i": {"P1": "a", "P2": "b"}})
    assert (sels[0].persona_id, sels[0].source) == ("P2", "field")
    assert (sels[1].persona_id, sels[1].source) == (None, "none")


def test_read_jsonl_gzip_and_errors(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n")
    assert [r["a"] for r in read_jsonl(path)] == [1, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=":2:"):
        read_jsonl(bad)


@pytest.mark.parametrize("source", ["amazon", "yelp"])
def test_published_judge_samples(source):
    root = _shared_sample() / source
    sels = parse_judge_selections(root / "4_selected_personas.jsonl.gz")
    stats = judge_field_disagreement(sels)
    assert stats["rows"] == 50
    assert stats["sources"].get("reasoning_id", 0) == 50  # every row ends in "<item>_P<k>"
    if source == "amazon":
        # the field says P1 on every row; the reasoning names other personas on most of them
        assert {s.field_persona_id for s in sels} == {"P1"}
        assert stats["reasoning_differs_from_field"] > 25
    else:
        assert stats["reasoning_differs_from_field"] == 0


def test_personas_by_item_from_rows_on_sample():
    root = _shared_sample() / "amazon"
    table = personas_by_item_from_rows(read_jsonl(root / "3_personas.jsonl.gz"))
    assert len(table) == 50
    assert all(2 <= len(v) <= 7 and "P1" in v for v in table.values())


# --- review-grounded labels and agreement ----------------------------------------------


def test_review_grounded_selection_matches_brute_force():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 6, size=20)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    bank = rng.standard_normal((ptr[-1], 8)) * rng.uniform(0.5, 3, (ptr[-1], 1))
    items = rng.integers(0, 20, size=50)
    reviews = rng.standard_normal((50, 8))
    idx, margin = review_grounded_selection(reviews, items, bank, ptr)
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    for i, it in enumerate(items):
        rows = np.arange(ptr[it], ptr[it + 1])
        cos = unit[rows] @ (reviews[i] / np.linalg.norm(reviews[i]))
        assert idx[i] == rows[np.argmax(cos)]
        if len(rows) == 1:
            assert margin[i] == np.inf
        else:
            top2 = np.sort(cos)[-2:]
            assert margin[i] == pytest.approx(top2[1] - top2[0], abs=1e-5)


def test_review_grounded_selection_input_errors():
    with pytest.raises(ValueError, match="dimension"):
        review_grounded_selection(np.ones((2, 3)), [0, 0], np.ones((2, 4)), [0, 2])
    with pytest.raises(ValueError, match="out of range"):
        review_grounded_selection(np.ones((2, 3)), [0, 5], np.ones((2, 3)), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        review_grounded_selection(np.full((1, 3), np.nan), [0], np.ones((2, 3)), [0, 2])


def test_selection_agreement_counts():
    a = {("u", "i"): "P1", ("u", "j"): "P2", ("v", "i"): "P3", ("w", "k"): None}
    b = {("u", "i"): "P1", ("u", "j"): "P3", ("w", "k"): "P1", ("x", "y"): "P1"}
    out = selection_agreement(a, b, n_choices={("u", "i"): 2, ("u", "j"): 4})
    assert out["n_both"] == 2 and out["n_agree"] == 1 and out["agreement"] == 0.5
    assert out["chance_agreement"] == pytest.approx((0.5 + 0.25) / 2)
    assert np.isnan(selection_agreement({}, {})["agreement"])


def test_exclude_leaves_a_persona_out_of_labels_and_hard_negatives():
    bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [1.0, 1.0]])
    ptr = np.array([0, 3, 4])
    reviews = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    idx, _ = review_grounded_selection(reviews, [0, 0, 1], bank, ptr)
    np.testing.assert_array_equal(idx, [0, 0, 3])
    idx, margin = review_grounded_selection(reviews, [0, 0, 1], bank, ptr, exclude=[0, -1, 3])
    np.testing.assert_array_equal(idx, [1, 0, -1])  # own review left out; item 1 has nothing left
    assert margin[0] == pytest.approx(0.8 - 0.0)
    pairs = TrainingPairs.from_persona_bank(reviews[:1], bank, ptr, [0], [1], exclude=[0])
    np.testing.assert_array_equal(pairs.hard_valid, [[True, False]])
    np.testing.assert_array_equal(pairs.hard_negatives[0, 0], bank[2])
    with pytest.raises(ValueError, match="excluded"):
        TrainingPairs.from_persona_bank(reviews[:1], bank, ptr, [0], [1], exclude=[1])


# --- one selection rule for live answers and stored rows ----------------------------


def test_choice_after_the_marker_beats_ids_mentioned_in_the_reasoning():
    from persona4rec.train.pairs import find_selection

    text = "B0X_P2 was close, but the user avoids loud gear.\nSelection:\n\n1. B0X quiet player"
    found = find_selection(text, item_id="B0X")
    assert (found.persona_id, found.source) == ("P1", "reasoning_number")
    assert text[: found.marker[0]].rstrip().endswith("loud gear.")
    # nothing usable after the marker: the lenient read falls back to the last id in the text
    found = find_selection("I weighed B0X_P1 against B0X_P3. Selection: the second fan", item_id="B0X")
    assert (found.persona_id, found.source) == ("P3", "reasoning_id")
    # the strict read (live answers, which can be repaired) does not
    assert find_selection("I weighed B0X_P1 against B0X_P3. Selection: the fan", item_id="B0X",
                          strict=True).persona_id is None
    # a marker without a colon only counts in the lenient read
    assert find_selection("My selection 3. B0X_P3", strict=True).marker is None
    assert find_selection("My selection 3. ok").persona_id == "P3"


def test_live_parser_and_row_parser_share_the_rule():
    pytest.importorskip("httpx")  # persona4rec.llm needs the llm extra
    from persona4rec.llm import stages
    from persona4rec.train import pairs

    assert stages.find_selection is pairs.find_selection
    ids = [f"B0X_P{k}" for k in range(1, 5)]
    for text, k in [("Fits.\n**Selection:** 2. B0X_P3", 3), ("Fits. Selection: P4", 4),
                    ("Fits. **Final selection**: 1", 1), ("Fits. Selection:\n2. B0X_P2", 2)]:
        assert stages.parse_selection(text, ids)["selected_index"] == k
        row = {"user_id": "u", "target_item_id": "B0X", "selected_persona_id": "P1", "selection_reasoning": text}
        assert parse_selection(row).persona_id == f"P{k}"


def test_published_rows_read_the_same_live_and_stored():
    pytest.importorskip("httpx")
    from persona4rec.llm.stages import parse_selection as parse_answer

    for source in ("amazon", "yelp"):
        rows = read_jsonl(_shared_sample() / source / "4_selected_personas.jsonl.gz")
        for row in rows:
            ids = [f"{row['target_item_id']}_P{k}" for k in range(1, 8)]
            live = parse_answer(row["selection_reasoning"], ids)["selected_index"]
            assert parse_selection(row).persona_id == f"P{live}"
