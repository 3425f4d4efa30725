"""Measured comparison of alignment methods on a review dataset with a leave-one-out split.

Protocol (see docs/training.md):

* reviews are deduplicated and split per user by time (last = test, second to last =
  validation, rest = train) by :mod:`persona4rec.data`;
* every review is embedded (``summary. text``) with the project's ONNX encoder; the
  vectors are cached on disk keyed by the encoder's identity and the texts;
* item personas are built from **training** reviews only: ``reviews`` (every training
  review of the item is one persona vector), or ``mean`` (one vector per item); an item
  without a training review gets its title embedding;
* a user profile is the normalised mean of the user's review vectors before the target
  (validation target: train reviews; test target: train + validation reviews);
* an item's score is the best cosine between the (mapped) profile and its (mapped)
  personas; all items the user has seen are excluded; ranks and NDCG@10 / HR@10 come from
  :mod:`persona4rec.evaluation.metrics`, confidence intervals and paired p-values from
  :mod:`persona4rec.evaluation.stats`;
* training pairs come only from training interactions: the profile of the user's train
  reviews strictly earlier than the target, and the review-grounded positive (the target
  item's persona nearest to the user's own review, the review itself excluded);
* early stopping uses validation NDCG@10; test is touched once per variant, at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from persona4rec.train.adapter import Adapter, AdapterConfig, train_adapter
from persona4rec.train.pairs import TrainingPairs, review_grounded_selection

PERSONA_KINDS = ("reviews", "mean")
EMBEDDING_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------
# data preparation


@dataclass
class AlignmentData:
    """Everything the experiment needs, in dense indices."""

    user: np.ndarray  # (N,) user index of each review
    item: np.ndarray  # (N,) item index
    timestamp: np.ndarray  # (N,) float seconds
    review_vecs: np.ndarray  # (N, d) float32, unit rows
    title_vecs: np.ndarray  # (I, d) float32, unit rows
    train: np.ndarray  # review rows
    valid: np.ndarray  # one per evaluated user
    test: np.ndarray  # aligned with valid (same user at the same position)
    n_users: int
    n_items: int
    split_desc: str

    @property
    def dim(self) -> int:
        return int(self.review_vecs.shape[1])


def review_texts(table) -> list[str]:
    """``summary. text`` per review (either part may be empty)."""
    out = []
    for title, text in zip(table.title, table.text):
        title, text = str(title or "").strip(), str(text or "").strip()
        out.append(f"{title}. {text}" if title and text else (title or text))
    return out


def cached_embeddings(texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], key: dict[str, Any],
                      cache_dir: str | os.PathLike | None) -> np.ndarray:
    """``encode(texts)``, cached as ``.npy`` under ``cache_dir`` keyed by ``key`` and the texts."""
    digest = hashlib.sha256(json.dumps({"v": EMBEDDING_CACHE_VERSION, "key": key}, sort_keys=True).encode())
    for t in texts:
        digest.update(t.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    name = f"emb-{digest.hexdigest()[:24]}.npy"
    if cache_dir is not None:
        path = Path(cache_dir) / name
        if path.is_file():
            vecs = np.load(path, allow_pickle=False)
            if vecs.shape[0] == len(texts):
                return vecs
    vecs = np.ascontiguousarray(encode(list(texts)), dtype=np.float32)
    if vecs.shape[0] != len(texts) or not np.all(np.isfinite(vecs)):
        raise ValueError("encoder returned a wrong number of rows or non-finite values")
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_dir) / (name + ".tmp.npy")
        np.save(tmp, vecs)
        os.replace(tmp, Path(cache_dir) / name)
    return vecs


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def prepare_data(dataset: str = "amazon-mi-5core", *, data_dir=None, tie_break: str = "random", seed: int = 0,
                 encoder=None, cache_dir=None, progress: bool = False) -> AlignmentData:
    """Load, dedupe and split ``dataset``; embed reviews and item titles (cached)."""
    from persona4rec.data import dedupe_keep_latest, leave_one_out_split, load_dataset

    reviews, items = load_dataset(dataset, data_dir=data_dir, download=False)
    reviews = dedupe_keep_latest(reviews)
    split = leave_one_out_split(reviews, tie_break=tie_break, seed=seed)
    users, user = np.unique(reviews.user.astype(str), return_inverse=True)
    item_ids, item = np.unique(reviews.item.astype(str), return_inverse=True)
    if encoder is None:
        from persona4rec.encoder import load_default_encoder

        encoder = load_default_encoder(intra_op_threads=0)
    ident = getattr(encoder, "identity", None)
    key = (ident() if callable(ident) else ident) or {"encoder": repr(encoder)}
    if cache_dir is None:
        from persona4rec.data import cache_dir as default_cache

        cache_dir = default_cache() / "embeddings"
    texts = review_texts(reviews)
    t0 = time.perf_counter()
    review_vecs = _unit(cached_embeddings(texts, encoder.encode, key, cache_dir))
    titles = [items.title_of(i, "") if items is not None else "" for i in item_ids]
    title_vecs = _unit(cached_embeddings(titles, encoder.encode, key, cache_dir))
    if progress:
        print(f"embedded {len(texts)} reviews and {len(titles)} titles in {time.perf_counter() - t0:.1f}s")
    return AlignmentData(
        user=user.astype(np.int64), item=item.astype(np.int64), timestamp=np.asarray(reviews.timestamp, np.float64),
        review_vecs=review_vecs, title_vecs=title_vecs, train=np.asarray(split.train), valid=np.asarray(split.valid),
        test=np.asarray(split.test), n_users=len(users), n_items=len(item_ids), split_desc=split.describe(),
    )


@dataclass
class PersonaBank:
    vectors: np.ndarray  # (P, d) unit rows
    item_ptr: np.ndarray  # (I + 1,)
    source_review: np.ndarray  # (P,) review row the persona is, or -1
    kind: str


def build_personas(data: AlignmentData, kind: str = "reviews") -> PersonaBank:
    """Item personas from training reviews only (title embedding when an item has none)."""
    if kind not in PERSONA_KINDS:
        raise ValueError(f"persona kind must be one of {PERSONA_KINDS}, got {kind!r}")
    rows = np.sort(data.train)
    order = rows[np.argsort(data.item[rows], kind="stable")]
    counts = np.bincount(data.item[order], minlength=data.n_items)
    vecs, src, ptr = [], [], [0]
    start = 0
    for it in range(data.n_items):
        mine = order[start : start + counts[it]]
        start += counts[it]
        if len(mine) == 0:
            vecs.append(data.title_vecs[it][None])
            src.append(np.array([-1]))
        elif kind == "reviews":
            vecs.append(data.review_vecs[mine])
            src.append(mine)
        else:
            vecs.append(_unit(data.review_vecs[mine].mean(axis=0))[None])
            src.append(np.array([-1]))
        ptr.append(ptr[-1] + len(vecs[-1]))
    return PersonaBank(np.concatenate(vecs).astype(np.float32), np.asarray(ptr, np.int64),
                       np.concatenate(src).astype(np.int64), kind)


def user_profiles(data: AlignmentData, rows: np.ndarray) -> np.ndarray:
    """(U, d) normalised mean of each user's review vectors in ``rows`` (zeros without any)."""
    sums = np.zeros((data.n_users, data.dim), np.float64)
    np.add.at(sums, data.user[rows], data.review_vecs[rows])
    return _unit(sums)


def training_pairs(data: AlignmentData, bank: PersonaBank, rows: np.ndarray | None = None) -> TrainingPairs:
    """Pairs from training interactions: (profile of strictly earlier train reviews, review-grounded persona)."""
    rows = np.asarray(data.train if rows is None else rows)
    order = rows[np.lexsort((data.timestamp[rows], data.user[rows]))]
    prof = np.zeros((len(order), data.dim), np.float64)
    has_history = np.zeros(len(order), bool)
    running = np.zeros(data.dim, np.float64)
    i = 0
    while i < len(order):  # one group of equal (user, timestamp) at a time
        u, t = data.user[order[i]], data.timestamp[order[i]]
        if i == 0 or data.user[order[i - 1]] != u:
            running[:] = 0.0
            count = 0
        j = i
        while j < len(order) and data.user[order[j]] == u and data.timestamp[order[j]] == t:
            j += 1
        if count > 0:
            prof[i:j] = running
            has_history[i:j] = True
        running += data.review_vecs[order[i:j]].sum(axis=0)
        count += j - i
        i = j
    keep = order[has_history]
    prof = _unit(prof[has_history])
    # the persona that is the user's own review (``reviews`` banks) is left out
    own = _own_persona_rows(bank, keep)
    pos, _ = review_grounded_selection(data.review_vecs[keep], data.item[keep], bank.vectors, bank.item_ptr, exclude=own)
    ok = pos >= 0
    return TrainingPairs.from_persona_bank(
        prof[ok], bank.vectors, bank.item_ptr, data.item[keep][ok], pos[ok], user_ids=data.user[keep][ok],
        exclude=own[ok], max_hard_negatives=32,
    )


def _own_persona_rows(bank: PersonaBank, review_rows: np.ndarray) -> np.ndarray:
    lookup = np.full(int(max(bank.source_review.max(), review_rows.max(initial=0))) + 1, -1, np.int64)
    has = bank.source_review >= 0
    lookup[bank.source_review[has]] = np.flatnonzero(has)
    return lookup[review_rows]


@dataclass
class HeldOutSelection:
    """Persona-selection targets of held-out interactions (labels from the held-out review)."""

    profiles: np.ndarray  # (n, d) profile from the history before the target
    items: np.ndarray  # (n,) target item
    positive: np.ndarray  # (n,) bank row of the review-grounded persona

    def accuracy(self, adapter: Adapter, bank: "PersonaBank") -> float:
        """Share of targets (items with >= 2 personas) whose positive persona ranks first (ties fail)."""
        u = adapter.apply(self.profiles)
        p = adapter.apply_persona(bank.vectors)
        hits, count = 0, 0
        for k in range(len(self.items)):
            lo, hi = bank.item_ptr[self.items[k]], bank.item_ptr[self.items[k] + 1]
            if hi - lo < 2:
                continue
            s = p[lo:hi] @ u[k]
            pos = self.positive[k] - lo
            others = np.delete(s, pos)
            hits += int(s[pos] > others.max())
            count += 1
        return hits / count if count else float("nan")


def heldout_selection(data: AlignmentData, bank: PersonaBank, target_rows: np.ndarray,
                      history_rows: np.ndarray) -> HeldOutSelection:
    prof = user_profiles(data, history_rows)[data.user[target_rows]]
    pos, _ = review_grounded_selection(data.review_vecs[target_rows], data.item[target_rows], bank.vectors, bank.item_ptr)
    return HeldOutSelection(prof, data.item[target_rows], pos)


# --------------------------------------------------------------------------------------
# ranking


def rank_targets(data: AlignmentData, bank: PersonaBank, adapter: Adapter, target_rows: np.ndarray,
                 history_rows: np.ndarray) -> np.ndarray:
    """1-based rank of each target item among all items unseen in the user's history."""
    from persona4rec.evaluation.metrics import ranks_from_scores

    users = data.user[target_rows]
    prof = adapter.apply(user_profiles(data, history_rows)[users])
    personas = adapter.apply_persona(bank.vectors)
    sims = prof @ personas.T
    scores = np.maximum.reduceat(sims, bank.item_ptr[:-1], axis=1).astype(np.float64)
    seen_pos = {u: k for k, u in enumerate(users)}
    hist_users = data.user[history_rows]
    sel = np.isin(hist_users, users)
    rows = np.array([seen_pos[u] for u in hist_users[sel]], np.int64)
    scores[rows, data.item[history_rows][sel]] = -np.inf
    return ranks_from_scores(scores, data.item[target_rows])


def ndcg_at(ranks: np.ndarray, k: int = 10) -> float:
    from persona4rec.evaluation.metrics import ndcg

    return float(np.mean(ndcg(ranks, k)))


# --------------------------------------------------------------------------------------
# the experiment


DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "adapter": {},
    "adapter+persona_side": {"persona_side": True},
    "adapter+hard_negatives": {"hard_negatives": True},
}


def run_experiment(data: AlignmentData, *, persona_kind: str = "reviews", config: AdapterConfig | None = None,
                   variants: dict[str, dict[str, Any]] | None = None, out_dir: str | os.PathLike | None = None,
                   progress: bool = False, n_boot: int = 2000) -> dict[str, Any]:
    """Train each variant (early stopping on validation NDCG@10) and compare it on test with no training."""
    from persona4rec.evaluation.metrics import per_user_metrics
    from persona4rec.evaluation.stats import bootstrap_ci, paired_bootstrap_pvalue

    base_cfg = config or AdapterConfig()
    variants = DEFAULT_VARIANTS if variants is None else variants
    t0 = time.perf_counter()
    bank = build_personas(data, persona_kind)
    pairs = training_pairs(data, bank)
    valid_hist = data.train
    test_hist = np.concatenate([data.train, data.valid])
    val_sel = heldout_selection(data, bank, data.valid, valid_hist)
    test_sel = heldout_selection(data, bank, data.test, test_hist)
    n_choices = np.diff(bank.item_ptr)[data.item[data.test]]

    def val_ndcg(adapter: Adapter) -> float:
        return ndcg_at(rank_targets(data, bank, adapter, data.valid, valid_hist), 10)

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    runs: list[tuple[str, Adapter, dict[str, Any] | None]] = [("none", Adapter.identity(data.dim), None)]
    for name, overrides in variants.items():
        cfg = replace(base_cfg, **overrides)
        res = train_adapter(pairs, cfg, validate=val_ndcg, progress=progress,
                            report_path=None if out is None else out / f"{name}.report.json",
                            extra_report={"validation_metric_name": "val_NDCG@10", "persona_kind": persona_kind,
                                          "split": data.split_desc})
        if out is not None:
            res.adapter.save(out / f"{name}.npz")
        runs.append((name, res.adapter, res.report))
    for name, adapter, report in runs:
        ranks = rank_targets(data, bank, adapter, data.test, test_hist)
        m = per_user_metrics(ranks, (10,))
        per_user[name] = m
        entry: dict[str, Any] = {
            "val_NDCG@10": val_ndcg(adapter),
            "test_persona_selection_accuracy": test_sel.accuracy(adapter, bank),
            "val_persona_selection_accuracy": val_sel.accuracy(adapter, bank),
        }
        for metric in ("NDCG@10", "HR@10"):
            mean, lo, hi = bootstrap_ci(m[metric], n_resamples=n_boot, seed=0)
            entry[f"test_{metric}"] = {"mean": mean, "ci95": [lo, hi]}
            if name != "none":
                entry[f"test_{metric}"]["p_vs_none"] = paired_bootstrap_pvalue(m[metric], per_user["none"][metric],
                                                                                n_resamples=5 * n_boot, seed=0)
        if report is not None:
            entry["training"] = {k: report[k] for k in ("best_epoch", "epochs_run", "seconds", "best_val_metric")}
        results[name] = entry
    chosen = max((n for n in results if n != "none"), key=lambda n: results[n]["val_NDCG@10"], default=None)
    summary = {
        "split": data.split_desc,
        "persona_kind": persona_kind,
        "config": base_cfg.to_dict(),
        "variants": {k: dict(v) for k, v in variants.items()},
        "data": {
            "users": data.n_users, "items": data.n_items, "reviews": int(len(data.user)), "dim": data.dim,
            "evaluated_users": int(len(data.test)), "personas": int(len(bank.vectors)),
            "train_pairs": len(pairs), "test_selection_pairs": int(np.sum(n_choices > 1)),
            "test_selection_chance": float(np.mean(1.0 / n_choices[n_choices > 1])) if np.any(n_choices > 1) else None,
        },
        "results": results,
        "chosen_on_validation": chosen,
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        (out / "evaluation.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (out / "evaluation.md").write_text(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"split: {summary['split']}; personas: {summary['persona_kind']} ({summary['data']['personas']}); "
        f"train pairs: {summary['data']['train_pairs']}; evaluated users: {summary['data']['evaluated_users']}",
        "",
        "| variant | val NDCG@10 | test NDCG@10 [95% CI] | p vs none | test HR@10 [95% CI] | p vs none | "
        "persona-selection acc (test) | best epoch | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["results"].items():
        n, h = r["test_NDCG@10"], r["test_HR@10"]
        tr = r.get("training") or {}
        lines.append(
            f"| {name} | {r['val_NDCG@10']:.4f} | {n['mean']:.4f} [{n['ci95'][0]:.4f}, {n['ci95'][1]:.4f}] | "
            f"{n.get('p_vs_none', float('nan')):.3g} | {h['mean']:.4f} [{h['ci95'][0]:.4f}, {h['ci95'][1]:.4f}] | "
            f"{h.get('p_vs_none', float('nan')):.3g} | {r['test_persona_selection_accuracy']:.3f} | "
            f"{tr.get('best_epoch', '-')} | {tr.get('seconds', 0):.1f} |"
        )
    lines.append("")
    lines.append(f"chance persona-selection accuracy (test): {summary['data']['test_selection_chance']}; "
                 f"variant chosen on validation: {summary['chosen_on_validation']}")
    return "\n".join(lines) + "\n"
