"""Measured comparison of alignment training against no training, on the evaluation harness.

Everything except the training itself is the harness's (:mod:`persona4rec.evaluation.runner`):
the load, dedupe, k-core and leave-one-out split by time, the review texts and their
cached embeddings (train and validation reviews only; test reviews are never encoded),
the item personas built from train reviews only (extractive k-means personas, and "every
train review is a persona"), the user profiles of :class:`persona4rec.profile.UserProfiler`
(recency-weighted mean of the last k reviews), full-catalog ranking with the user's
history excluded through :class:`persona4rec.PersonaIndex` (int8 max-sim), and the
metrics, bootstrap intervals and paired p-values.

What this module adds:

* **training pairs** from training interactions only: for each user's train reviews in
  the split's chronological order, the target is review j >= 1, the profile is the
  profiler's profile of reviews 0..j-1, and the positive persona is review-grounded: the
  target item's persona nearest to the user's own review of it (when every review is a
  persona, the user's own review is left out of its item's personas for that pair, as a
  label and as a hard negative);
* **early stopping** on validation NDCG@10 (full ranking; validation targets never make
  pairs);
* **persona-selection accuracy** on held-out pairs: the validation interactions
  (profile from train reviews, label from the validation review), which are used neither
  for training nor for early stopping;
* test NDCG@10 / HR@10 of each trained variant against no training (the identity
  adapter through the very same code path).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from persona4rec.train.adapter import Adapter, AdapterConfig, train_adapter
from persona4rec.train.pairs import TrainingPairs, review_grounded_selection

PERSONA_KINDS = ("extractive", "reviews")

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "adapter": {},
    "adapter+persona_side": {"persona_side": True},
    "adapter+hard_negatives": {"hard_negatives": True},
}


def prepare_evaluation(config=None, encoder=None, *, cache: Any = None, progress: Callable[[str], Any] | None = None):
    """Run the harness's data steps (load, encode, item side, profiles); returns the Evaluation."""
    from persona4rec.evaluation.runner import Evaluation, EvaluationConfig

    config = config or EvaluationConfig()
    if encoder is None:
        from persona4rec.default_model import load_default_encoder

        encoder = load_default_encoder(intra_op_threads=0)
    ev = Evaluation(config, encoder, progress=progress, cache=cache)
    ev.load()
    ev.encode_texts()
    ev.build_item_side()
    ev.build_profiles()
    return ev


def persona_set(ev, kind: str):
    """(PersonaSet, source review row of each persona or -1) for ``kind``."""
    if kind not in PERSONA_KINDS:
        raise ValueError(f"persona kind must be one of {PERSONA_KINDS}, got {kind!r}")
    if kind == "extractive":
        ps = ev.personas
        return ps, np.full(ps.n_personas, -1, np.int64)
    ps = ev.review_personas
    train = ev.data.split.train
    src = np.array([train[c[0]] if len(c) == 1 and ps.support[p] == 1 else -1 for p, c in enumerate(ps.central_reviews)],
                   np.int64)
    return ps, src


def _own_rows(source: np.ndarray, review_rows: np.ndarray) -> np.ndarray:
    size = int(max(source.max(initial=-1), review_rows.max(initial=-1))) + 1
    lookup = np.full(max(size, 1), -1, np.int64)
    has = source >= 0
    lookup[source[has]] = np.flatnonzero(has)
    return lookup[review_rows]


def training_histories(ev) -> tuple[np.ndarray, list[np.ndarray]]:
    """(target rows, history rows before each target) over train reviews in chronological order."""
    d = ev.data
    in_train = np.zeros(len(d.reviews), bool)
    in_train[d.split.train] = True
    by_user: dict[int, list[int]] = {}
    for r in d.split.chronological:
        if in_train[r]:
            by_user.setdefault(int(d.review_user[r]), []).append(int(r))
    targets, histories = [], []
    for rows in by_user.values():
        for j in range(1, len(rows)):
            targets.append(rows[j])
            histories.append(np.asarray(rows[:j], np.int64))
    return np.asarray(targets, np.int64), histories


def training_pairs(ev, kind: str = "extractive", max_hard_negatives: int = 32) -> TrainingPairs:
    """Review-grounded (profile, persona) pairs from the split's training interactions only."""
    d = ev.data
    personas, source = persona_set(ev, kind)
    targets, histories = training_histories(ev)
    profiles = ev.profiles(histories)
    own = _own_rows(source, targets)
    items = d.review_item[targets]
    pos, _ = review_grounded_selection(ev.review_vectors[targets], items, personas.vectors, personas.offsets, exclude=own)
    ok = pos >= 0
    return TrainingPairs.from_persona_bank(
        profiles[ok], personas.vectors, personas.offsets, items[ok], pos[ok], user_ids=d.review_user[targets][ok],
        exclude=own[ok], max_hard_negatives=max_hard_negatives,
    )


@dataclass
class HeldOutSelection:
    """Persona-selection targets (labels from the held-out review's nearest persona)."""

    profiles: np.ndarray
    items: np.ndarray
    positive: np.ndarray

    def accuracy(self, adapter: Adapter, vectors: np.ndarray, offsets: np.ndarray) -> tuple[float, int, float]:
        """(accuracy, number of targets whose item has >= 2 personas, chance level) - ties fail."""
        u = adapter.apply(self.profiles)
        p = adapter.apply_persona(vectors)
        hits, count, chance = 0, 0, 0.0
        for k in range(len(self.items)):
            lo, hi = int(offsets[self.items[k]]), int(offsets[self.items[k] + 1])
            if hi - lo < 2 or self.positive[k] < 0:
                continue
            s = p[lo:hi] @ u[k]
            pos = int(self.positive[k]) - lo
            hits += int(s[pos] > np.delete(s, pos).max())
            count += 1
            chance += 1.0 / (hi - lo)
        if not count:
            return float("nan"), 0, float("nan")
        return hits / count, count, chance / count


def validation_selection(ev, kind: str) -> HeldOutSelection:
    d = ev.data
    personas, _ = persona_set(ev, kind)
    rows = d.split.valid
    pos, _ = review_grounded_selection(ev.review_vectors[rows], d.review_item[rows], personas.vectors, personas.offsets)
    return HeldOutSelection(ev.valid_profiles, d.review_item[rows], pos)


def score_phase(ev, personas, adapter: Adapter, phase: str) -> np.ndarray:
    """(users, items) max-sim scores through PersonaIndex, adapter on both sides, history -inf
    (the phase's users and known history as the harness defines them, in either protocol)."""
    from persona4rec.evaluation.runner import index_scores, make_index

    data = ev.data.phase(phase)
    profiles = ev.valid_profiles if phase == "valid" else ev.test_profiles
    mapped = replace(personas, vectors=adapter.apply_persona(personas.vectors)) if adapter.has_persona_map else personas
    return index_scores(make_index(mapped), adapter.apply(profiles), data.history, data.users)


def rank_phase(ev, personas, adapter: Adapter, phase: str) -> np.ndarray:
    """Ranks of the phase's targets under full ranking with the adapter applied on both sides."""
    from persona4rec.evaluation.metrics import ranks_from_scores

    return ranks_from_scores(score_phase(ev, personas, adapter, phase), ev.data.phase(phase).targets)


def ease_scores(ev) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """EASE scores (history -inf) for both phases, its l2 chosen on validation NDCG@10 by the
    harness's own choice (:func:`persona4rec.evaluation.choices.choose_cf`, the harness's grid)."""
    from persona4rec.evaluation import baselines as bl
    from persona4rec.evaluation.choices import choose_cf
    from persona4rec.evaluation.runner import EASE_GRID

    d = ev.data
    grid = getattr(ev.config, "ease_grid", None) or EASE_GRID
    chosen = choose_cf(bl.EASE, grid, d.train_matrix, d.phase("valid"), d.phase("test"))
    return ({"valid": chosen.valid_scores, "test": chosen.test_scores},
            {"params": chosen.params, "val_NDCG@10": chosen.valid_ndcg})


def choose_alpha(text_valid: np.ndarray, base_valid: np.ndarray, targets: np.ndarray) -> tuple[float, dict[str, float]]:
    """The fusion weight with the best validation NDCG@10 (ties: the smaller alpha), and the
    curve: the harness's choice (:func:`persona4rec.evaluation.choices.choose_full_fusion_alpha`)."""
    from persona4rec.evaluation.choices import choose_full_fusion_alpha
    from persona4rec.evaluation.runner import ALPHA_GRID

    return choose_full_fusion_alpha(text_valid, base_valid, targets, ALPHA_GRID)


def run_experiment(ev, *, persona_kind: str = "extractive", config: AdapterConfig | None = None,
                   variants: dict[str, dict[str, Any]] | None = None, out_dir: str | os.PathLike | None = None,
                   progress: bool = False, say: Callable[[str], Any] | None = None,
                   evaluate_test: bool = True, fuse_ease: bool = False) -> dict[str, Any]:
    """Train each variant (early stopping on validation NDCG@10); compare each with no training on test.

    ``evaluate_test=False`` reports validation numbers only: use it to choose settings, so
    the test split is looked at once, for the settings chosen. ``fuse_ease=True`` also
    fuses each variant's persona scores with EASE (the harness's formula; EASE's l2 and
    the weight alpha chosen on validation NDCG@10) and compares on test with EASE alone
    and with the untrained fusion.
    """
    from persona4rec.evaluation.metrics import ndcg, per_user_metrics
    from persona4rec.evaluation.stats import bootstrap_ci, paired_bootstrap_pvalue

    say = say or (lambda message: None)
    base_cfg = config or AdapterConfig()
    variants = DEFAULT_VARIANTS if variants is None else variants
    n_boot = int(ev.config.n_bootstrap)
    t0 = time.perf_counter()
    personas, _ = persona_set(ev, persona_kind)
    pairs = training_pairs(ev, persona_kind)
    say(f"[{persona_kind}] {len(pairs)} training pairs, {personas.n_personas} personas "
        f"({time.perf_counter() - t0:.1f}s)")
    held_out = validation_selection(ev, persona_kind)

    def val_ndcg(adapter: Adapter) -> float:
        return float(ndcg(rank_phase(ev, personas, adapter, "valid"), 10).mean())

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, Adapter, dict[str, Any] | None]] = [("none", Adapter.identity(ev.encoder.dim), None)]
    for name, overrides in variants.items():
        cfg = replace(base_cfg, **overrides)
        res = train_adapter(pairs, cfg, validate=val_ndcg, progress=progress,
                            report_path=None if out is None else out / f"{persona_kind}-{name}.report.json",
                            extra_report={"validation_metric_name": "val_NDCG@10", "persona_kind": persona_kind,
                                          "split": ev.data.split.describe()})
        if out is not None:
            res.adapter.save(out / f"{persona_kind}-{name}.npz")
        say(f"[{persona_kind}] {name}: best epoch {res.report['best_epoch']} of {res.report['epochs_run']}, "
            f"val NDCG@10 {res.report['curve'][0]['val_metric']:.4f} -> {res.report['best_val_metric']:.4f}, "
            f"{res.report['seconds']:.1f}s")
        runs.append((name, res.adapter, res.report))

    results: dict[str, Any] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    fused_user: dict[str, dict[str, np.ndarray]] = {}
    ease_info = None
    fused_entries: dict[str, dict[str, Any]] = {}
    if fuse_ease:
        from persona4rec.evaluation.candidates import fuse
        from persona4rec.evaluation.metrics import ranks_from_scores

        ease, ease_info = ease_scores(ev)
        if evaluate_test:
            fused_user["EASE"] = per_user_metrics(ranks_from_scores(ease["test"], ev.data.test_targets), (10,))
            mean, lo, hi = bootstrap_ci(fused_user["EASE"]["NDCG@10"], n_resamples=n_boot, seed=ev.config.seed)
            ease_info["test_NDCG@10"] = {"mean": mean, "ci95": [lo, hi]}
    for name, adapter, report in runs:
        if fuse_ease:
            alpha, _ = choose_alpha(score_phase(ev, personas, adapter, "valid"), ease["valid"], ev.data.valid_targets)
            fused: dict[str, Any] = {"alpha": alpha}
            fused_entries[name] = fused
            if evaluate_test:
                fused_scores = fuse(score_phase(ev, personas, adapter, "test"), ease["test"], alpha)
                fm = per_user_metrics(ranks_from_scores(fused_scores, ev.data.test_targets), (10,))
                fused_user[name] = fm
                for metric in ("NDCG@10", "HR@10"):
                    mean, lo, hi = bootstrap_ci(fm[metric], n_resamples=n_boot, seed=ev.config.seed)
                    fused[f"test_{metric}"] = {"mean": mean, "ci95": [lo, hi], "p_vs_EASE": paired_bootstrap_pvalue(
                        fm[metric], fused_user["EASE"][metric], n_resamples=5 * n_boot, seed=ev.config.seed)}
                    if name != "none":
                        fused[f"test_{metric}"]["p_vs_none_fused"] = paired_bootstrap_pvalue(
                            fm[metric], fused_user["none"][metric], n_resamples=5 * n_boot, seed=ev.config.seed)
    for name, adapter, report in runs:
        acc, n_sel, chance = held_out.accuracy(adapter, personas.vectors, personas.offsets)
        entry: dict[str, Any] = {"val_NDCG@10": val_ndcg(adapter), "heldout_persona_selection_accuracy": acc}
        if report is not None:
            entry["training"] = {k: report[k] for k in ("best_epoch", "epochs_run", "seconds", "best_val_metric",
                                                         "stopped_early")}
        if name in fused_entries:
            entry["fused_with_EASE"] = fused_entries[name]
        results[name] = entry
        if not evaluate_test:
            continue
        m = per_user_metrics(rank_phase(ev, personas, adapter, "test"), (10,))
        per_user[name] = m
        for metric in ("NDCG@10", "HR@10"):
            mean, lo, hi = bootstrap_ci(m[metric], n_resamples=n_boot, seed=ev.config.seed)
            entry[f"test_{metric}"] = {"mean": mean, "ci95": [lo, hi]}
            if name != "none":
                entry[f"test_{metric}"]["p_vs_none"] = paired_bootstrap_pvalue(
                    m[metric], per_user["none"][metric], n_resamples=5 * n_boot, seed=ev.config.seed)
    chosen = max((n for n in results if n != "none"), key=lambda n: results[n]["val_NDCG@10"], default=None)
    summary = {
        "split": ev.data.split.describe(),
        "persona_kind": persona_kind,
        "config": base_cfg.to_dict(),
        "variants": {k: dict(v) for k, v in variants.items()},
        "data": {
            **{k: v for k, v in ev.dataset_stats.items() if k in ("reviews", "users", "items", "train", "valid", "test")},
            "dim": int(ev.encoder.dim), "personas": int(personas.n_personas), "train_pairs": len(pairs),
            "heldout_selection_pairs": n_sel, "heldout_selection_chance": chance,
        },
        "profile": {"k": ev.config.profile_k, "gamma": ev.config.profile_gamma,
                    "min_rating": ev.config.profile_min_rating},
        "results": results,
        "chosen_on_validation": chosen,
        "test_evaluated": evaluate_test,
        "EASE": ease_info,
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        (out / f"{persona_kind}-evaluation.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (out / f"{persona_kind}-evaluation.md").write_text(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    d = summary["data"]
    lines = [
        f"split: {summary['split']}; personas: {summary['persona_kind']} ({d['personas']}); "
        f"train pairs: {d['train_pairs']}; evaluated users: {d['test']}",
        "",
        "| variant | val NDCG@10 | test NDCG@10 [95% CI] | p vs none | test HR@10 [95% CI] | p vs none | "
        "held-out persona selection | best epoch | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["results"].items():
        tr = r.get("training") or {}
        if "test_NDCG@10" not in r:  # validation-only run
            lines.append(f"| {name} | {r['val_NDCG@10']:.4f} | - | - | - | - | "
                         f"{r['heldout_persona_selection_accuracy']:.3f} | {tr.get('best_epoch', '-')} | "
                         f"{tr.get('seconds', 0.0):.1f} |")
            continue
        n, h = r["test_NDCG@10"], r["test_HR@10"]
        lines.append(
            f"| {name} | {r['val_NDCG@10']:.4f} | {n['mean']:.4f} [{n['ci95'][0]:.4f}, {n['ci95'][1]:.4f}] | "
            f"{n.get('p_vs_none', float('nan')):.3g} | {h['mean']:.4f} [{h['ci95'][0]:.4f}, {h['ci95'][1]:.4f}] | "
            f"{h.get('p_vs_none', float('nan')):.3g} | {r['heldout_persona_selection_accuracy']:.3f} | "
            f"{tr.get('best_epoch', '-')} | {tr.get('seconds', 0.0):.1f} |"
        )
    if summary.get("EASE"):
        e = summary["EASE"]
        lines += ["", f"Fused with EASE (l2 {e['params'].get('l2')}, val NDCG@10 {e['val_NDCG@10']:.4f}"
                  + (f", test NDCG@10 {e['test_NDCG@10']['mean']:.4f} [{e['test_NDCG@10']['ci95'][0]:.4f}, "
                     f"{e['test_NDCG@10']['ci95'][1]:.4f}]" if "test_NDCG@10" in e else "") + "):", "",
                  "| variant | alpha (on validation) | test NDCG@10 [95% CI] | p vs EASE | p vs untrained fusion | "
                  "test HR@10 [95% CI] | p vs EASE |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in summary["results"].items():
            f = r.get("fused_with_EASE")
            if not f or "test_NDCG@10" not in f:
                continue
            n, h = f["test_NDCG@10"], f["test_HR@10"]
            lines.append(f"| {name} + EASE | {f['alpha']:.2f} | {n['mean']:.4f} [{n['ci95'][0]:.4f}, {n['ci95'][1]:.4f}] "
                         f"| {n['p_vs_EASE']:.3g} | {n.get('p_vs_none_fused', float('nan')):.3g} | "
                         f"{h['mean']:.4f} [{h['ci95'][0]:.4f}, {h['ci95'][1]:.4f}] | {h['p_vs_EASE']:.3g} |")
    lines.append("")
    lines.append(f"held-out persona selection: {d['heldout_selection_pairs']} validation interactions whose item has "
                 f">= 2 personas; chance {d['heldout_selection_chance']:.3f}. "
                 f"Variant chosen on validation: {summary['chosen_on_validation']}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# finetune: the same comparison with the encoder itself trained (torch), served through ONNX


def _profile_selection(ev, rows: np.ndarray) -> list[str]:
    """Texts of the profiler's selection of a history (the fallback profiler's when none is rated high enough)."""
    from persona4rec.profile import EmptyHistoryError

    history = ev.history(rows)
    try:
        selected = ev.profiler.select(history)
    except EmptyHistoryError:
        selected = ev.fallback_profiler.select(history)
    return [x.text for x in selected]


@dataclass
class FinetuneData:
    """The harness's texts, profiles and personas as CSR groups over one text table."""

    texts: list[str]
    text_id: dict[str, int]
    persona_ptr: np.ndarray
    persona_text: np.ndarray
    personas: Any
    source: np.ndarray

    def profile_groups(self, ev, histories: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from persona4rec.profile import recency_weights

        ptr, idx, w = [0], [], []
        for rows in histories:
            texts = _profile_selection(ev, rows)
            idx.extend(self.text_id[t] for t in texts)
            w.extend(recency_weights(len(texts), ev.profiler.gamma).tolist())
            ptr.append(len(idx))
        return np.asarray(ptr, np.int64), np.asarray(idx, np.int64), np.asarray(w, np.float32)


def finetune_data(ev, kind: str) -> FinetuneData:
    """Text table = train+validation review texts and item titles; a persona = the mean of its
    central train reviews (exact for ``reviews``; for ``extractive`` it stands in for the k-means
    centroid), or its item's title when the item has no train review."""
    d = ev.data
    personas, source = persona_set(ev, kind)
    texts = list(dict.fromkeys([str(t) for t in ev.texts[ev.encoded_rows]] +
                               [d.item_title(i) for i in range(len(d.item_ids))]))
    text_id = {t: j for j, t in enumerate(texts)}
    train = d.split.train
    owner = personas.item_of_persona()
    ptr, idx = [0], []
    for p in range(personas.n_personas):
        central = personas.central_reviews[p]
        if len(central):
            idx.extend(text_id[str(ev.texts[train[c]])] for c in central)
        else:
            idx.append(text_id[d.item_title(int(owner[p]))])
        ptr.append(len(idx))
    return FinetuneData(texts, text_id, np.asarray(ptr, np.int64), np.asarray(idx, np.int64), personas, source)


def finetune_pairs(ev, data: FinetuneData):
    """The adapter's review-grounded training pairs, as text groups for :func:`persona4rec.train.finetune.finetune`."""
    from persona4rec.train.finetune import TextPairs

    d = ev.data
    personas = data.personas
    targets, histories = training_histories(ev)
    own = _own_rows(data.source, targets)
    items = d.review_item[targets]
    pos, _ = review_grounded_selection(ev.review_vectors[targets], items, personas.vectors, personas.offsets, exclude=own)
    ok = np.flatnonzero(pos >= 0)
    ptr, idx, w = data.profile_groups(ev, [histories[i] for i in ok])
    return TextPairs(data.texts, ptr, idx, w, data.persona_ptr, data.persona_text, None, personas.offsets,
                     items[ok], pos[ok], d.review_user[targets][ok], exclude=own[ok])


class TowerScorer:
    """Validation NDCG@10 and held-out persona selection with the tower's current weights."""

    def __init__(self, ev, data: FinetuneData, kind: str):
        self.ev, self.data = ev, data
        self.valid_groups = data.profile_groups(ev, ev.valid_history_rows)
        self.held_out = validation_selection(ev, kind)  # labels from the base encoder, fixed
        # (accuracy, targets, chance) of held-out persona selection at each validation, in call order
        self.selections: list[tuple[float, int, float]] = []

    def vectors(self, tower) -> tuple[np.ndarray, np.ndarray]:
        emb = tower.embed(np.arange(len(self.data.texts)))

        def means(ptr, idx, w):
            rows = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
            out = np.zeros((len(ptr) - 1, emb.shape[1]), np.float32)
            np.add.at(out, rows, emb[idx] * (w[:, None] if w is not None else 1.0))
            return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        profiles = means(*self.valid_groups)
        personas = means(self.data.persona_ptr, self.data.persona_text, None)
        return profiles, personas

    def __call__(self, tower) -> float:
        from persona4rec.evaluation.metrics import ndcg, ranks_from_scores
        from persona4rec.evaluation.runner import index_scores, make_index

        profiles, personas = self.vectors(tower)
        held = replace(self.held_out, profiles=profiles)
        self.selections.append(held.accuracy(Adapter.identity(profiles.shape[1]), personas,
                                             self.data.personas.offsets))
        ps = replace(self.data.personas, vectors=personas)
        d = self.ev.data
        scores = index_scores(make_index(ps), profiles, d.train_matrix, d.valid_users)
        return float(ndcg(ranks_from_scores(scores, d.valid_targets), 10).mean())

    def selection_accuracy(self) -> tuple[float, int, float]:
        """(accuracy, targets, chance) of the last validated weights."""
        return self.selections[-1]


def run_finetune_experiment(ev, model_dir, *, persona_kind: str = "reviews", config=None, out_dir,
                            progress: bool = False, say: Callable[[str], Any] | None = None,
                            cache_dir: str | os.PathLike | None = None,
                            allow_low_int8_agreement: bool = False) -> dict[str, Any]:
    """Fine-tune the encoder on the review-grounded pairs, export it to ONNX, and compare on test.

    The test numbers of the fine-tuned encoder come from the harness run end to end with
    the exported ONNX model (re-encoding every text; personas re-extracted from its
    vectors), against the same harness with the base encoder (``ev``): paired per user.
    """
    from persona4rec.encoder import Encoder
    from persona4rec.evaluation.metrics import ndcg, per_user_metrics
    from persona4rec.evaluation.stats import bootstrap_ci, paired_bootstrap_pvalue
    from persona4rec.train.finetune import FinetuneConfig, export_finetuned, finetune

    say = say or (lambda message: None)
    config = config or FinetuneConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = finetune_data(ev, persona_kind)
    pairs = finetune_pairs(ev, data)
    scorer = TowerScorer(ev, data, persona_kind)
    say(f"[finetune/{persona_kind}] {len(pairs)} pairs over {len(data.texts)} texts, {pairs.n_personas} personas")
    result = finetune(model_dir, pairs, config, validate=scorer, progress=progress, say=say,
                      report_path=out / f"{persona_kind}-finetune.report.json")
    # the kept weights were validated during training: read their selection accuracy, not validate again
    best = [c["step"] for c in result.report["curve"]].index(result.report["best_step"])
    selection = scorer.selections[best]
    untrained_selection = scorer.selections[0][0]
    t_export = time.perf_counter()
    onnx_dir = export_finetuned(result, out / f"{persona_kind}-finetuned", overwrite=True,
                                allow_low_int8_agreement=allow_low_int8_agreement)
    export_seconds = time.perf_counter() - t_export
    say(f"[finetune/{persona_kind}] exported to {onnx_dir} in {export_seconds:.0f}s")

    encoder = Encoder(onnx_dir, intra_op_threads=0)
    t_eval = time.perf_counter()
    ev_ft = prepare_evaluation(ev.config, encoder, cache=cache_dir if cache_dir is not None else False,
                               progress=say)
    n_boot = int(ev.config.n_bootstrap)
    identity = Adapter.identity(ev.encoder.dim)
    results: dict[str, Any] = {}
    for kind in PERSONA_KINDS:
        base_personas, ft_personas = persona_set(ev, kind)[0], persona_set(ev_ft, kind)[0]
        base_m = per_user_metrics(rank_phase(ev, base_personas, identity, "test"), (10,))
        ft_m = per_user_metrics(rank_phase(ev_ft, ft_personas, identity, "test"), (10,))
        entry: dict[str, Any] = {}
        for name, m in (("none", base_m), ("finetune", ft_m)):
            entry[name] = {}
            for metric in ("NDCG@10", "HR@10"):
                mean, lo, hi = bootstrap_ci(m[metric], n_resamples=n_boot, seed=ev.config.seed)
                entry[name][f"test_{metric}"] = {"mean": mean, "ci95": [lo, hi]}
                if name == "finetune":
                    entry[name][f"test_{metric}"]["p_vs_none"] = paired_bootstrap_pvalue(
                        m[metric], base_m[metric], n_resamples=5 * n_boot, seed=ev.config.seed)
        entry["none"]["val_NDCG@10"] = float(ndcg(rank_phase(ev, base_personas, identity, "valid"), 10).mean())
        entry["finetune"]["val_NDCG@10"] = float(ndcg(rank_phase(ev_ft, ft_personas, identity, "valid"), 10).mean())
        results[kind] = entry
    summary = {
        "trained_on_personas": persona_kind,
        "split": ev.data.split.describe(),
        "config": config.to_dict(),
        "training": {k: result.report[k] for k in ("best_step", "steps", "epochs_run", "best_val_metric", "seconds",
                                                    "cache_seconds", "trainable_parameters", "layers", "curve",
                                                    "stopped_early", "stopped_by_time_limit", "max_length")},
        "base_encoder": {"fingerprint": ev.encoder.fingerprint, "dim": int(ev.encoder.dim)},
        "finetuned_encoder": {"fingerprint": encoder.fingerprint, "max_length": getattr(encoder, "max_length", None)},
        "heldout_persona_selection": {"untrained_torch": untrained_selection, "finetune_torch": selection[0],
                                      "pairs": selection[1], "chance": selection[2],
                                      "at_each_validation": [s[0] for s in scorer.selections]},
        "export_seconds": round(export_seconds, 2),
        "reencode_and_evaluate_seconds": round(time.perf_counter() - t_eval, 2),
        "onnx_dir": str(onnx_dir),
        "results": results,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / f"{persona_kind}-finetune-evaluation.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / f"{persona_kind}-finetune-evaluation.md").write_text(format_finetune_table(summary))
    return summary


def format_finetune_table(summary: dict[str, Any]) -> str:
    t = summary["training"]
    lines = [f"finetune trained on {summary['trained_on_personas']} personas: {t['layers']['trained']} of "
             f"{t['layers']['trained'] + t['layers']['frozen']} layers, {t['trainable_parameters']:,} parameters, "
             f"{t['steps']} steps, best step {t['best_step']}, training {t['seconds']:.0f}s "
             f"(frozen-layer cache {t['cache_seconds']:.0f}s); export {summary['export_seconds']:.0f}s; "
             f"re-encode + evaluate {summary['reencode_and_evaluate_seconds']:.0f}s", "",
             "| personas | encoder | val NDCG@10 | test NDCG@10 [95% CI] | p vs base | test HR@10 [95% CI] | p vs base |",
             "|---|---|---|---|---|---|---|"]
    for kind, entry in summary["results"].items():
        for name in ("none", "finetune"):
            r = entry[name]
            n, h = r["test_NDCG@10"], r["test_HR@10"]
            lines.append(f"| {kind} | {'base' if name == 'none' else 'fine-tuned'} | {r['val_NDCG@10']:.4f} | "
                         f"{n['mean']:.4f} [{n['ci95'][0]:.4f}, {n['ci95'][1]:.4f}] | {_p(n)} | "
                         f"{h['mean']:.4f} [{h['ci95'][0]:.4f}, {h['ci95'][1]:.4f}] | {_p(h)} |")
    s = summary["heldout_persona_selection"]
    lines += ["", f"held-out persona selection (torch): {s['untrained_torch']:.3f} untrained, {s['finetune_torch']:.3f} "
              f"fine-tuned (best weights), over {s['pairs']} validation interactions (chance {s['chance']:.3f})"]
    return "\n".join(lines) + "\n"


def _p(entry: dict[str, Any]) -> str:
    return f"{entry['p_vs_none']:.3g}" if "p_vs_none" in entry else "-"
