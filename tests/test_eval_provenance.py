"""`evaluate --personas`: persona files built from held-out reviews, or without provenance, are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from persona4rec.data.heldout import review_ids
from persona4rec.evaluation.provenance import PersonaProvenanceError, check_persona_provenance
from persona4rec.evaluation.runner import Evaluation, EvaluationConfig
from test_eval_pipeline import FAST, HashEncoder
from test_eval_protocols import spread_reviews


def persona_file(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "3_personas.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def row(item: str, ids: list[str] | None) -> dict:
    out = {"item_id": item, "personas": [{"ID": "P1", "Name": "Gigging bassist", "Description": "Plays live.",
                                          "Preference_Rationale": "Needs a sturdy strap."}]}
    if ids is not None:
        out["review_ids"] = ids
    return out


def item_side(split: str, path: str, trust: bool = False) -> Evaluation:
    ev = Evaluation(EvaluationConfig(k_core=1, split=split, persona_file=path, trust_personas=trust, **FAST),
                    HashEncoder(), cache=False)
    ev.load(spread_reviews(), None)
    ev.encode_texts()
    ev.build_item_side()
    return ev


@pytest.mark.parametrize("split", ["loo", "temporal"])
def test_personas_from_training_reviews_pass_and_held_out_ones_are_refused(tmp_path: Path, split: str) -> None:
    probe = item_side(split, None)  # type: ignore[arg-type]
    d = probe.data
    train_ids = review_ids(d.reviews, d.split.train)
    item = d.item_ids[int(d.review_item[d.split.train[0]])]
    ok = persona_file(tmp_path, [row(item, train_ids[:3])])
    ev = item_side(split, ok)
    assert ev.choices["persona_provenance"]["rows_with_review_ids"] == 1
    assert "Gigging bassist" in ev.personas.names
    held = review_ids(d.reviews, d.split.test[:1])
    bad = persona_file(tmp_path, [row(item, train_ids[:2] + held)])
    with pytest.raises(PersonaProvenanceError, match="holds out"):
        item_side(split, bad)
    with pytest.raises(PersonaProvenanceError, match="holds out"):  # --trust-personas never excuses a leak
        item_side(split, bad, trust=True)


def test_files_without_review_ids_need_trust(tmp_path: Path) -> None:
    path = persona_file(tmp_path, [row("I1", None), row("I2", ["U1:I2"])])
    with pytest.raises(PersonaProvenanceError, match="--trust-personas"):
        check_persona_provenance(path, {"U9:I9"})
    summary = check_persona_provenance(path, {"U9:I9"}, trust=True)
    assert summary["rows_without_review_ids"] == 1 and summary["trusted_without_provenance"]


def test_temporal_holds_out_every_review_from_the_first_cut(tmp_path: Path) -> None:
    probe = item_side("temporal", None)  # type: ignore[arg-type]
    d = probe.data
    after_cut = np.flatnonzero(d.reviews.timestamp >= d.split.valid_start)
    not_a_target = np.setdiff1d(after_cut, np.concatenate([d.split.valid, d.split.test]))
    assert len(not_a_target)  # validation-period history rows are not targets, but still held out of personas
    path = persona_file(tmp_path, [row("I1", review_ids(d.reviews, not_a_target[:1]))])
    with pytest.raises(PersonaProvenanceError, match="holds out"):
        item_side("temporal", path)


def test_cli_has_the_split_and_trust_flags() -> None:
    from persona4rec.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--personas", "x.jsonl", "--trust-personas", "--split", "temporal"])
    assert args.trust_personas and args.split == "temporal"
