"""`persona4rec evaluate --adapter`: a trained user-persona adapter inside the evaluation harness.

Synthetic reviews and a hashed bag-of-words encoder: no model and no shared data needed.
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from persona4rec.data import ReviewTable
from persona4rec.evaluation.runner import AdapterFileError, Evaluation, EvaluationConfig, load_adapter
from persona4rec.train.adapter import Adapter

DIM = 32
FAST = dict(k_core=1, itemknn_grid=[{"shrink": 10.0, "neighbors": 100}], ease_grid=[{"l2": 250.0}],
            bpr_grid=[{"factors": 8, "reg": 0.03, "lr": 0.1}], bpr_max_epochs=25, n_bootstrap=50,
            latency_users=10, candidate_sizes=(5, 10), alpha_grid=(0.0, 0.5, 1.0))
WORDS = ["bright", "warm", "cheap", "sturdy", "loud", "quiet", "smooth", "heavy", "light", "crisp"]


class HashEncoder:
    """A deterministic stand-in encoder (signed hashed bag of words)."""

    fingerprint = "test-hash-bow-32"
    dim = DIM
    identity = {"model": "hash-bow", "fingerprint": fingerprint}

    def encode(self, texts, batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                h = zlib.crc32(word.encode())
                out[row, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        out[:, 0] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def synthetic_reviews(seed: int = 0, users: int = 30, items: int = 30, per_user: int = 5) -> ReviewTable:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for k, i in enumerate(rng.choice(items, size=per_user, replace=False)):
            text = " ".join(rng.choice(WORDS, size=6)) + f" u{u} i{i}"
            rows.append((f"U{u}", f"I{i}", float(rng.integers(1, 6)), float(k), f"title u{u} i{i}", text))
    return ReviewTable.from_columns(*map(list, zip(*rows)))


def trained_like(persona_side: bool, seed: int = 1) -> Adapter:
    """A non-trivial adapter (what training could produce): random residual maps."""
    rng = np.random.default_rng(seed)
    params = {"user.A": rng.normal(0, 0.4, (DIM, DIM))}
    if persona_side:
        params["persona.P"] = rng.normal(0, 0.4, (DIM, 4))
        params["persona.Q"] = rng.normal(0, 0.4, (4, DIM))
    return Adapter(DIM, params, meta={"config": {"note": "test"}, "best_epoch": 3})


def prepared(adapter_file: str | None = None, persona_file: str | None = None) -> Evaluation:
    """The harness up to the indexes (item side, profiles, persona indexes)."""
    # The persona files here carry no review_ids (provenance is tested in test_eval_provenance.py).
    ev = Evaluation(EvaluationConfig(adapter_file=adapter_file, persona_file=persona_file, trust_personas=True,
                                     **FAST), HashEncoder(), cache=False)
    ev.load(synthetic_reviews(), None)
    ev.encode_texts()
    ev.build_item_side()
    ev.build_profiles()
    ev.build_indexes()
    return ev


def saved(tmp_path: Path, adapter: Adapter, name: str = "adapter.npz") -> str:
    path = tmp_path / name
    adapter.save(path)
    return str(path)


def maxsim(queries: np.ndarray, vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    sims = queries @ vectors.T
    return np.stack([sims[:, offsets[i]:offsets[i + 1]].max(axis=1) for i in range(len(offsets) - 1)], axis=1)


@pytest.fixture(scope="module")
def plain() -> Evaluation:
    return prepared()


# ----------------------------------------------------------------- identity


def test_identity_adapter_reproduces_the_run_without_one(tmp_path: Path) -> None:
    reviews = synthetic_reviews()
    reports = []
    for adapter_file in (None, saved(tmp_path, Adapter.identity(DIM))):
        ev = Evaluation(EvaluationConfig(adapter_file=adapter_file, **FAST), HashEncoder(), cache=False)
        reports.append((ev, ev.run(reviews, None)))
    (base, without), (ident, with_identity) = reports
    for a, b in zip(base.results, ident.results, strict=True):
        assert (a.name, a.setting) == (b.name, b.setting)
        np.testing.assert_array_equal(a.valid_ranks, b.valid_ranks, err_msg=a.name)
        np.testing.assert_array_equal(a.test_ranks, b.test_ranks, err_msg=a.name)
    assert json.dumps(without["methods"]) == json.dumps(with_identity["methods"])
    assert without["p_values"] == with_identity["p_values"] and without["examples"] == with_identity["examples"]
    np.testing.assert_allclose(ident.test_profiles, base.test_profiles, atol=1e-6)
    assert without["config"]["adapter_file"] is None and "adapter" not in without["choices"]
    # the report names the adapter it was run with
    assert with_identity["config"]["adapter_file"] == reports[1][0].config.adapter_file
    choice = with_identity["choices"]["adapter"]
    assert choice["header"]["dim"] == DIM and choice["header"]["params"] == [] and len(choice["sha256"]) == 64
    from persona4rec.evaluation.report import render_markdown

    assert "User-persona adapter `" in render_markdown(with_identity)
    assert "User-persona adapter" not in render_markdown(without)


# ---------------------------------------------------------- a trained adapter


@pytest.mark.parametrize("persona_side", [False, True])
def test_profiles_and_item_side_go_through_the_adapter(tmp_path: Path, plain: Evaluation, persona_side: bool) -> None:
    adapter = trained_like(persona_side)
    ev = prepared(saved(tmp_path, adapter))
    assert ev.adapter.has_persona_map == persona_side
    # user side: every profile is adapter.apply of the untrained one
    for mapped, raw in ((ev.valid_profiles, plain.valid_profiles), (ev.test_profiles, plain.test_profiles)):
        np.testing.assert_allclose(mapped, adapter.apply(raw), atol=1e-5)
        assert not np.allclose(mapped, raw, atol=1e-2)
    np.testing.assert_allclose(ev.profiles(ev.test_history_rows, adapted=False), plain.test_profiles, atol=1e-6)
    for pos in (0, 7):  # the latency path's per-user profile
        rows = ev.test_history_rows[pos]
        np.testing.assert_allclose(ev.profile(rows), adapter.apply(plain.profile(rows)), atol=1e-5)
    # item side: mapped by the persona-side map, untouched without one
    sets = [(ev.item_vectors, plain.item_vectors), (ev.personas.vectors, plain.personas.vectors),
            (ev.review_personas.vectors, plain.review_personas.vectors)]
    for mapped, raw in sets:
        if persona_side:
            np.testing.assert_allclose(mapped, adapter.apply_persona(raw), atol=1e-5)
            assert not np.allclose(mapped, raw, atol=1e-2)
        else:
            np.testing.assert_array_equal(mapped, raw)
    # ... and so are the vectors inside the persona indexes that score the users
    queries = ev.test_profiles
    for index, personas in ((ev.persona_index, plain.personas), (ev.review_index, plain.review_personas)):
        vectors = adapter.apply_persona(personas.vectors) if persona_side else personas.vectors
        ids, scores = index.search(queries, k=index.n_items)
        got = np.full((len(queries), index.n_items), np.nan)
        np.put_along_axis(got, ids, scores, axis=1)
        np.testing.assert_allclose(got, maxsim(queries, vectors, personas.offsets), atol=2e-2)
    choice = ev.choices["adapter"]
    assert choice["header"]["meta"]["best_epoch"] == 3 and "user.A" in choice["header"]["params"]
    assert ("mapped" in choice["item_side"]) == persona_side


def test_llm_personas_from_a_file_are_mapped_too(tmp_path: Path) -> None:
    rows = [{"item_id": f"I{i}", "personas": [{"ID": "P1", "Name": f"{w} fan", "Description": f"Wants {w} gear."},
                                              {"ID": "P2", "Name": "bargain hunter", "Description": "Cheap."}]}
            for i, w in zip(range(4), WORDS)]
    persona_file = tmp_path / "3_personas.jsonl"
    persona_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = trained_like(persona_side=True)
    raw = prepared(persona_file=str(persona_file))
    ev = prepared(saved(tmp_path, adapter), persona_file=str(persona_file))
    n_without = len(ev.data.item_ids) - len(rows)
    assert ev.personas.params["items_without_llm_personas"] == raw.personas.params["items_without_llm_personas"] == n_without
    assert "bargain hunter" in ev.personas.names
    np.testing.assert_allclose(ev.personas.vectors, adapter.apply_persona(raw.personas.vectors), atol=1e-5)


# -------------------------------------------------------------- bad files


def test_dimension_mismatch_fails_before_any_data_work(tmp_path: Path) -> None:
    path = saved(tmp_path, Adapter.identity(DIM * 2))
    with pytest.raises(AdapterFileError, match=r"maps 64-d vectors but the encoder makes 32-d") as info:
        Evaluation(EvaluationConfig(adapter_file=path, **FAST), HashEncoder(), cache=False)
    assert path in str(info.value) and "--encoder-dir" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"not an npz at all", "not an .npz"),
    ("truncated", "not a readable persona4rec adapter"),
    ("no-header", "no header"),
])
def test_missing_or_corrupt_files_are_named(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "adapter.npz"
    if content == "truncated":
        trained_like(False).save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "no-header":
        np.savez(path, weights=np.zeros(3))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(AdapterFileError, match=message) as info:
        load_adapter(path, DIM)
    assert str(path) in str(info.value) and "pickle" not in str(info.value)


# --------------------------------------------------------------------- CLI


def test_cli_turns_a_bad_adapter_into_a_clear_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import persona4rec.default_model
    from persona4rec.cli import build_parser

    def no_encoder(**kwargs):
        raise AssertionError("a bad adapter file must fail before the encoder loads")

    monkeypatch.setattr(persona4rec.default_model, "load_default_encoder", no_encoder)
    missing = tmp_path / "nope.npz"
    args = build_parser().parse_args(["evaluate", "--adapter", str(missing), "--out", str(tmp_path / "r")])
    assert args.adapter == str(missing)
    from persona4rec.evaluation.command import default_out

    assert default_out(args) == "reports/evaluate/amazon-mi-5core-random-adapter-nope"  # the plain report is kept
    assert default_out(build_parser().parse_args(["evaluate"])) == "reports/evaluate/amazon-mi-5core-random"
    with pytest.raises(SystemExit) as info:
        args.func(args)
    assert str(info.value).startswith("persona4rec evaluate: --adapter:") and str(missing) in str(info.value)
    # a readable file of the wrong dimension fails once the encoder is known, before the data loads
    monkeypatch.setattr(persona4rec.default_model, "load_default_encoder", lambda **kwargs: HashEncoder())
    wrong = saved(tmp_path, Adapter.identity(DIM + 1), "wrong.npz")
    args = build_parser().parse_args(["evaluate", "--adapter", wrong, "--data-dir", str(tmp_path / "no-data")])
    with pytest.raises(SystemExit, match="maps 33-d vectors but the encoder makes 32-d"):
        args.func(args)
