"""The end-to-end evaluation: load, split, personas, encode, index, baselines, metrics.

Protocols (see :mod:`persona4rec.data.split`): ``split="loo"`` (leave-one-out by time)
or ``split="temporal"`` (two global time cuts; each user's first review of a period is
their target there).

* Validation: history = train reviews, target = the validation item. Every choice
  (CF hyper-parameters, BPR epochs, the first stage, the fusion weight alpha, the rerank
  depth) is made here, on NDCG@10; the report's headline row is the fused configuration
  chosen here, and its p-values are Holm-corrected over the reported family.
* Test: history = train + validation-period reviews, target = the test item. Reported once.
* Item side (personas, item vectors, popularity, CF item models) is built from train
  reviews only; test review texts are never encoded at all.
* Full ranking ranks every item except the user's history; reranking reorders the
  first stage's top-N (the paper's setting), whose hit rate is the rerank ceiling.
* A trained user-persona adapter (``adapter_file``, :mod:`persona4rec.train.adapter`) maps
  every user profile (:meth:`Evaluation.profiles`, :meth:`Evaluation.profile`) and, when it
  has a persona-side map, every persona and item vector set scored against them
  (:meth:`Evaluation.build_item_side`); every text method then sees the mapped vectors.
"""

from __future__ import annotations

import copy
import html
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from persona4rec.data import (
    ItemTable,
    LeaveOneOutSplit,
    ReviewTable,
    TemporalSplit,
    dedupe_keep_latest,
    k_core,
    leave_one_out_split,
    load_dataset,
    temporal_split,
)
from persona4rec.evaluation import baselines as bl
from persona4rec.evaluation.choices import CFChoice, PhaseData, choose_alpha, choose_cf, mean_ndcg10, phase_scores
from persona4rec.evaluation.candidates import candidate_lists, ceiling, exclude_history, fuse, fused_rerank, rerank
from persona4rec.evaluation.metrics import DEFAULT_CUTOFFS, ranks_from_lists, ranks_from_scores
from persona4rec.evaluation.metrics import ndcg as ndcg_at
from persona4rec.evaluation.metrics import per_user_metrics
from persona4rec.hashing import file_sha256
from persona4rec.evaluation.stats import bootstrap_ci, holm_adjust, paired_bootstrap_pvalue
from persona4rec.personas import PersonaSet, extract_personas, mean_item_vectors
from persona4rec.profile import (
    DEFAULT_GAMMA,
    DEFAULT_K,
    EmptyHistoryError,
    InteractionEmbeddingCache,
    Interaction,
    ReviewTextTemplate,
    UserProfiler,
    text_key,
)

Progress = Callable[[str], Any]

# Validation grids (small on purpose: the whole job must run in minutes on two cores).
ITEMKNN_GRID = [{"shrink": s, "neighbors": n} for s in (0.0, 10.0, 50.0, 200.0, 500.0) for n in (50, 100, None)]
EASE_GRID = [{"l2": v} for v in (10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0)]
BPR_GRID = [{"factors": 64, "reg": r, "lr": 0.1} for r in (0.01, 0.03, 0.1)] + [{"factors": 128, "reg": 0.03, "lr": 0.1}]
BPR_MAX_EPOCHS = 300
BPR_EVAL_EVERY = 25
CI_METRICS = ("HR@10", "NDCG@10")
ALPHA_GRID = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.05))
# Temperatures of the persona soft maximum (log-mean-exp); chosen on validation.
SOFTMAX_TEMPERATURES = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
SPLITS = ("loo", "temporal")


@dataclass
class EvaluationConfig:
    """Everything that defines a run; saved verbatim in the report."""

    dataset: str = "amazon-mi-5core"
    data_dir: str | None = None
    split: str = "loo"  # "loo" (leave-one-out by time) or "temporal" (global time cuts)
    valid_share: float = 0.1  # temporal: share of reviews in the validation period
    test_share: float = 0.1  # temporal: share of reviews in the test period
    tie_break: str = "random"
    seed: int = 0
    k_core: int = 5
    max_personas: int = 5
    reviews_per_persona: int = 2
    # Persona counts tried on validation (persona max-sim, full ranking); () keeps max_personas.
    max_personas_grid: tuple[int, ...] = (1, 2, 3, 5, 8)
    profile_gamma: float = DEFAULT_GAMMA
    profile_k: int = DEFAULT_K
    candidate_sizes: tuple[int, ...] = (20, 50, 100)
    cutoffs: tuple[int, ...] = DEFAULT_CUTOFFS
    n_bootstrap: int = 2000
    latency_users: int = 300
    show_users: int = 3
    profile_min_rating: float | None = 3.0
    itemknn_grid: list[dict[str, Any]] = field(default_factory=lambda: list(ITEMKNN_GRID))
    ease_grid: list[dict[str, Any]] = field(default_factory=lambda: list(EASE_GRID))
    bpr_grid: list[dict[str, Any]] = field(default_factory=lambda: list(BPR_GRID))
    bpr_max_epochs: int = BPR_MAX_EPOCHS
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    softmax_temperatures: tuple[float, ...] = SOFTMAX_TEMPERATURES
    persona_file: str | None = None
    trust_personas: bool = False  # accept a persona file whose rows do not list their review_ids
    adapter_file: str | None = None  # a trained persona4rec.train.adapter .npz; None: no adapter


@dataclass
class Prepared:
    """The cleaned, split and indexed dataset (dense user/item positions inside)."""

    reviews: ReviewTable
    items: ItemTable | None
    split: LeaveOneOutSplit | TemporalSplit
    user_ids: list[str]
    item_ids: list[str]
    review_user: np.ndarray
    review_item: np.ndarray
    valid_users: np.ndarray
    test_users: np.ndarray
    valid_targets: np.ndarray
    test_targets: np.ndarray
    train_matrix: sp.csr_matrix
    test_history: sp.csr_matrix

    @property
    def eval_users(self) -> np.ndarray:
        """The test users (under leave-one-out also the validation users, in the same order)."""
        return self.test_users

    def users(self, phase: str) -> np.ndarray:
        return self.valid_users if phase == "valid" else self.test_users

    def history_matrix(self, phase: str) -> sp.csr_matrix:
        """What is known when ranking for ``phase``: train, or train + the validation period."""
        return self.train_matrix if phase == "valid" else self.test_history

    def phase(self, phase: str) -> PhaseData:
        """Users, known history and targets of ``phase`` ("valid" or "test")."""
        if phase not in ("valid", "test"):
            raise ValueError(f"phase must be 'valid' or 'test', got {phase!r}")
        return PhaseData(self.users(phase), self.history_matrix(phase),
                         self.valid_targets if phase == "valid" else self.test_targets)

    def item_title(self, item: int) -> str:
        item_id = self.item_ids[item]
        return html.unescape(self.items.title_of(item_id, item_id)) if self.items is not None else item_id


def prepare(reviews: ReviewTable, items: ItemTable | None, config: EvaluationConfig) -> Prepared:
    """Dedupe, k-core, split and map ids to dense positions."""
    table = k_core(dedupe_keep_latest(reviews), config.k_core)
    if config.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {config.split!r}")
    split: LeaveOneOutSplit | TemporalSplit
    if config.split == "temporal":
        split = temporal_split(table, config.valid_share, config.test_share, config.tie_break, config.seed)
    else:
        split = leave_one_out_split(table, config.tie_break, config.seed)
    user_ids = sorted(set(table.user.tolist()))
    item_ids = sorted(set(table.item.tolist()))
    user_pos = {u: i for i, u in enumerate(user_ids)}
    item_pos = {x: i for i, x in enumerate(item_ids)}
    review_user = np.fromiter((user_pos[u] for u in table.user), dtype=np.int64, count=len(table))
    review_item = np.fromiter((item_pos[x] for x in table.item), dtype=np.int64, count=len(table))
    n_users, n_items = len(user_ids), len(item_ids)
    train_matrix = bl.interaction_matrix(review_user[split.train], review_item[split.train], n_users, n_items)
    known = np.concatenate([split.train, split.valid_period])
    test_history = bl.interaction_matrix(review_user[known], review_item[known], n_users, n_items)
    return Prepared(table, items, split, user_ids, item_ids, review_user, review_item,
                    valid_users=review_user[split.valid], test_users=review_user[split.test],
                    valid_targets=review_item[split.valid],
                    test_targets=review_item[split.test], train_matrix=train_matrix, test_history=test_history)


class AdapterFileError(ValueError):
    """An adapter file that is missing, unreadable, or made for another encoder."""


def load_adapter(path: str | os.PathLike, dim: int | None = None) -> Any:
    """:meth:`persona4rec.train.adapter.Adapter.load` with the failures named: a missing or
    corrupt file, or (``dim`` given) a dimension other than the encoder's, raise
    :class:`AdapterFileError` with the file and what to do."""
    from persona4rec.train.adapter import Adapter

    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "does not exist"
        raise AdapterFileError(f"adapter file {path!r} {what}; pass the .npz that "
                               "`persona4rec train-adapter` wrote (Adapter.save)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise AdapterFileError(f"adapter file {path!r} cannot be read: {exc}") from exc
    if magic != b"PK\x03\x04":  # np.load would talk about pickles here
        raise AdapterFileError(f"adapter file {path!r} is {'empty' if not magic else 'not an .npz (zip) archive'}; "
                               "pass the .npz that `persona4rec train-adapter` wrote (Adapter.save)")
    try:
        adapter = Adapter.load(path)
    except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise AdapterFileError(f"adapter file {path!r} is not a readable persona4rec adapter ({exc}); "
                               "pass the .npz that `persona4rec train-adapter` wrote, or train it again") from exc
    if dim is not None and adapter.dim != int(dim):
        raise AdapterFileError(f"adapter file {path!r} maps {adapter.dim}-d vectors but the encoder makes {dim}-d "
                               "ones; evaluate with the encoder the adapter was trained on (--encoder-dir), "
                               "or train an adapter on this encoder's embeddings")
    return adapter


def review_texts(data: Prepared, rows: np.ndarray) -> list[str]:
    """The text embedded for each review row, by the profile module's Amazon 5-core
    template (item title, review title, review text), so item and user sides agree."""
    template = ReviewTextTemplate()
    return [template.render({"item_title": data.item_title(int(data.review_item[r])),
                             "summary": data.reviews.title[r], "reviewText": data.reviews.text[r]})
            for r in rows]


def embed_with_cache(encoder: Any, cache: InteractionEmbeddingCache, texts: Sequence[str],
                     progress: Progress | None = None, chunk: int = 512) -> np.ndarray:
    """Vectors of ``texts`` (input order), encoding only those the cache lacks, in chunks
    that are stored as they finish so an interrupted run resumes where it stopped."""
    keys = [text_key(t) for t in texts]
    rows = cache.rows_of(keys)
    todo = list({keys[i]: i for i, row in enumerate(rows) if row < 0}.values())
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        cache.put([keys[i] for i in part], encoder.encode([texts[i] for i in part], batch_size=32))
        if progress is not None:
            progress(f"  encoded {min(start + chunk, len(todo))}/{len(todo)} new texts")
    return cache.gather(cache.rows_of(keys)) if keys else np.zeros((0, encoder.dim), np.float32)


@dataclass
class MethodResult:
    """One method in one setting: per-user ranks on validation and test, plus what was chosen."""

    name: str
    setting: str
    valid_ranks: np.ndarray
    test_ranks: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    latency_us: dict[str, float] = field(default_factory=dict)


class Evaluation:
    """Runs the pipeline; each step is a method so tests can drive parts of it."""

    def __init__(self, config: EvaluationConfig, encoder: Any, progress: Progress | None = None,
                 cache: InteractionEmbeddingCache | str | None | bool = None) -> None:
        """``encoder`` has ``encode(texts, batch_size)``, ``fingerprint`` and ``dim`` (an
        :class:`persona4rec.encoder.Encoder`); ``cache`` is the interaction-embedding
        cache (a directory, None for the per-user default, False for memory only)."""
        self.config = config
        self.encoder = encoder
        self.progress = progress or (lambda message: None)
        self.timings: dict[str, float] = {}
        self.results: list[MethodResult] = []
        self.choices: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self.profiler = UserProfiler(encoder, cache=cache, k=config.profile_k, gamma=config.profile_gamma,
                                     min_rating=config.profile_min_rating, template=ReviewTextTemplate())
        # Users whose every review is rated below min_rating still get a profile: from all of them.
        self.fallback_profiler = UserProfiler(encoder, cache=self.profiler.cache, k=config.profile_k,
                                              gamma=config.profile_gamma, min_rating=None,
                                              template=ReviewTextTemplate())
        # Loaded (and checked against the encoder) before any data work, so a bad file fails in seconds.
        self.adapter = load_adapter(config.adapter_file, encoder.dim) if config.adapter_file else None
        if self.adapter is not None:
            self.choices["adapter"] = {
                "file": config.adapter_file, "sha256": file_sha256(Path(config.adapter_file)),
                "header": self.adapter.header(),
                "user_side": "adapter.apply on every validation, test and latency-path profile",
                "item_side": ("mapped by adapter.apply_persona (personas, every-review personas, dense item vectors)"
                              if self.adapter.has_persona_map else "unchanged (the adapter has no persona-side map)"),
            }

    # ---------------------------------------------------------------- helpers
    def _step(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 2)
        self.progress(f"[{time.perf_counter() - self._t0:6.1f}s] {name} done in {self.timings[name]:.1f}s")

    # ------------------------------------------------------------------- data
    def load(self, reviews: ReviewTable | None = None, items: ItemTable | None = None) -> Prepared:
        started = time.perf_counter()
        if reviews is None:
            reviews, items = load_dataset(self.config.dataset, self.config.data_dir)
        self.data = prepare(reviews, items, self.config)
        d = self.data
        self.dataset_stats = {
            "reviews": len(d.reviews), "users": len(d.user_ids), "items": len(d.item_ids),
            "train": len(d.split.train), "valid": len(d.split.valid), "test": len(d.split.test),
            "split": d.split.describe(),
        }
        if d.split.protocol == "loo":
            self.dataset_stats["users_with_last_two_on_the_same_timestamp"] = int(
                (d.reviews.timestamp[d.split.valid] == d.reviews.timestamp[d.split.test]).sum())
        else:
            self.dataset_stats["validation_period_reviews"] = len(d.split.valid_period)
        # A target item without any train interaction cannot be recommended by any CF method
        # (popularity, co-occurrence and factors all learn from train only); text still can.
        train_counts = np.bincount(d.review_item[d.split.train], minlength=len(d.item_ids))
        self.dataset_stats["targets_no_cf_can_recommend"] = {
            "valid": int((train_counts[d.valid_targets] == 0).sum()),
            "test": int((train_counts[d.test_targets] == 0).sum())}
        self.dataset_stats["items_without_train_reviews"] = int((train_counts == 0).sum())
        self._step("load and split", started)
        return d

    # ------------------------------------------------------------------- text
    def encode_texts(self) -> None:
        """Embed train and validation-period reviews (never test ones) and item titles."""
        started = time.perf_counter()
        d = self.data
        self.encoded_rows = np.unique(np.concatenate([d.split.train, d.split.valid_period]))
        self.texts = np.empty(len(d.reviews), dtype=object)
        self.texts[self.encoded_rows] = review_texts(d, self.encoded_rows)
        titles = [d.item_title(i) for i in range(len(d.item_ids))]
        self.progress(f"encoding {len(self.encoded_rows)} train+validation-period reviews and {len(titles)} item titles "
                      f"({len(self.profiler.cache)} texts already cached)")
        vectors = embed_with_cache(self.encoder, self.profiler.cache, list(self.texts[self.encoded_rows]) + titles,
                                   self.progress)
        self.review_vectors = np.zeros((len(d.reviews), vectors.shape[1]), dtype=np.float32)
        self.review_vectors[self.encoded_rows] = vectors[:len(self.encoded_rows)]
        self.title_vectors = vectors[len(self.encoded_rows):]
        self._step("encode", started)

    def build_item_side(self) -> None:
        """Item vectors and personas from train reviews only."""
        started = time.perf_counter()
        d, c = self.data, self.config
        train = d.split.train
        self.item_vectors = mean_item_vectors(len(d.item_ids), d.review_item[train], self.review_vectors[train],
                                              self.title_vectors)
        self.personas = self._personas(train, c.max_personas, c.reviews_per_persona)
        if c.persona_file:
            from persona4rec.data.heldout import review_ids
            from persona4rec.evaluation.provenance import check_persona_provenance
            from persona4rec.personas import load_persona_file, personas_from_file

            in_train = np.zeros(len(d.reviews), dtype=bool)
            in_train[train] = True
            self.choices["persona_provenance"] = check_persona_provenance(
                c.persona_file, review_ids(d.reviews, np.flatnonzero(~in_train)), trust=c.trust_personas,
                split_name=d.split.describe())

            self.personas = personas_from_file(
                d.item_ids, load_persona_file(c.persona_file),
                lambda texts: embed_with_cache(self.encoder, self.profiler.cache, texts), self.personas)
            self.progress(f"LLM personas from {c.persona_file}; "
                          f"{self.personas.params['items_without_llm_personas']} items kept extractive ones")
        # "Every review is a persona": the upper end of the multi-vector axis.
        self.review_personas = self._personas(train, 10**6, 1)
        if self.adapter is not None and self.adapter.has_persona_map:
            # Every vector set scored against (mapped) profiles goes through the persona-side map.
            self.item_vectors = self.adapter.apply_persona(self.item_vectors)
            self.personas = replace(self.personas, vectors=self.adapter.apply_persona(self.personas.vectors))
            self.review_personas = replace(self.review_personas,
                                           vectors=self.adapter.apply_persona(self.review_personas.vectors))
        self._step("item vectors and personas", started)

    def _personas(self, rows: np.ndarray, max_personas: int, reviews_per_persona: int) -> PersonaSet:
        d = self.data
        return extract_personas(
            d.item_ids, d.review_item[rows], self.review_vectors[rows], d.reviews.title[rows],
            d.reviews.text[rows], max_personas=max_personas, reviews_per_persona=reviews_per_persona,
            fallback_vectors=self.title_vectors, fallback_names=[d.item_title(i) for i in range(len(d.item_ids))],
            seed=self.config.seed)

    def build_profiles(self) -> None:
        """Validation profiles from train history; test profiles add the validation period
        (under leave-one-out: the validation review), oldest first in the split's order."""
        started = time.perf_counter()
        d = self.data
        in_train = np.zeros(len(d.reviews), dtype=bool)
        in_train[d.split.train] = True
        known = in_train.copy()
        known[d.split.valid_period] = True
        by_user: dict[int, list[int]] = {}
        for r in d.split.chronological:
            by_user.setdefault(int(d.review_user[r]), []).append(int(r))
        self.valid_history_rows = [np.array([r for r in by_user[int(u)] if in_train[r]], dtype=np.int64)
                                   for u in d.valid_users]
        self.test_history_rows = [np.array([r for r in by_user[int(u)] if known[r]], dtype=np.int64)
                                  for u in d.test_users]
        self.valid_profiles = self.profiles(self.valid_history_rows)
        fallbacks = {"valid": self.profile_fallbacks}
        self.test_profiles = self.profiles(self.test_history_rows)
        fallbacks["test"] = self.profile_fallbacks
        self.choices["profile"] = {"k": self.config.profile_k, "gamma": self.config.profile_gamma,
                                   "min_rating": self.config.profile_min_rating,
                                   "users_without_a_review_at_min_rating_profiled_from_all": fallbacks}
        self._step("user profiles", started)

    def history(self, rows: np.ndarray) -> list[Interaction]:
        """A user's history as the profiler takes it: oldest first, in the split's order."""
        d = self.data
        return [Interaction(self.texts[r], float(d.reviews.rating[r]), None, d.item_ids[int(d.review_item[r])])
                for r in rows]

    def profile(self, rows: np.ndarray, adapted: bool = True) -> np.ndarray:
        """One user's profile (the online path: cache lookups, a weighted mean, the adapter if any)."""
        history = self.history(rows)
        try:
            vector = self.profiler.profile(history)
        except EmptyHistoryError:
            vector = self.fallback_profiler.profile(history)
        return self.adapter.apply(vector) if adapted and self.adapter is not None else vector

    def profiles(self, history_rows: list[np.ndarray], adapted: bool = True) -> np.ndarray:
        """Profiles of many users, (n, d); mapped by the adapter when there is one, unless
        ``adapted`` is False (the untrained profiles, e.g. to build training pairs)."""
        histories = [self.history(rows) for rows in history_rows]
        batch = self.profiler.profile_many(histories)
        out = np.zeros((len(histories), self.encoder.dim), dtype=np.float32)
        out[batch.positions] = batch.vectors
        if len(batch.empty_positions):
            fallback = self.fallback_profiler.profile_many([histories[i] for i in batch.empty_positions])
            out[batch.empty_positions[fallback.positions]] = fallback.vectors
        self.profile_fallbacks = int(len(batch.empty_positions))
        return self.adapter.apply(out) if adapted and self.adapter is not None else out

    def choose_persona_count(self) -> int:
        """Choose ``max_personas`` from ``config.max_personas_grid`` on validation NDCG@10 of
        persona max-sim (full ranking; ties: fewer personas) and rebuild the extractive
        personas with it. Skipped (the configured count stays) with LLM personas from a file
        or an empty grid."""
        c, d = self.config, self.data
        grid = tuple(sorted(set(c.max_personas_grid)))
        if not grid or c.persona_file:
            self.choices["persona_count"] = {"max_personas": c.max_personas, "chosen_on_validation": False}
            return c.max_personas
        started = time.perf_counter()
        train = d.split.train
        valid = d.phase("valid")
        curve, sets = {}, {}
        for count in grid:
            personas = self._personas(train, count, c.reviews_per_persona)
            if self.adapter is not None and self.adapter.has_persona_map:
                personas = replace(personas, vectors=self.adapter.apply_persona(personas.vectors))
            scores = index_scores(make_index(personas), self.valid_profiles, valid.history, valid.users)
            curve[str(count)] = round(float(ndcg_at(ranks_from_scores(scores, valid.targets), 10).mean()), 5)
            sets[count] = personas
        best = max(grid, key=lambda n: (curve[str(n)], -n))
        self.personas = sets[best]
        self.choices["persona_count"] = {"max_personas": best, "chosen_on_validation": True,
                                         "reviews_per_persona": c.reviews_per_persona,
                                         "valid_ndcg@10_by_max_personas": curve,
                                         "personas": {str(n): sets[n].n_personas for n in grid}}
        self._step(f"persona count (grid of {len(grid)} on validation): {best}", started)
        return best

    def build_indexes(self) -> None:
        started = time.perf_counter()
        self.persona_index = make_index(self.personas)
        self.review_index = make_index(self.review_personas)
        self._step("persona indexes", started)

    # --------------------------------------------------------------- baselines
    # ------------------------------------------------------- scoring steps
    # Each step is a module-level function with typed inputs and one typed output
    # (fit_cf_baselines -> CFStage, score_text_methods -> TextStage, fuse_and_rerank ->
    # FusionStage); these methods only call them and keep the outputs.
    def fit_baselines(self) -> CFStage:
        """Fit popularity, ItemKNN, EASE and BPR, choosing hyper-parameters on validation."""
        self.cf = fit_cf_baselines(self.data, self.config, self._step)
        self.cf_scores, self.cf_models, self.first_stage = self.cf.scores, self.cf.models, self.cf.first_stage
        self.choices.update(self.cf.choices)
        self.results += self.cf.results
        return self.cf

    def score_text(self) -> TextStage:
        """Dense single-vector, persona max-sim (plain and calibrated) and every-review max-sim
        scores over the full catalog."""
        started = time.perf_counter()
        self.text = score_text_methods(
            self.data, self.config, {"valid": self.valid_profiles, "test": self.test_profiles}, self.item_vectors,
            self.personas, self.persona_index, self.review_personas, self.review_index)
        self.text_scores, self.persona_count_excess = self.text.scores, self.text.persona_count_excess
        self.choices["persona_calibration"] = self.text.calibration
        self.results += self.text.results
        self._step("text scoring (full catalog)", started)
        return self.text

    def fuse_and_rerank(self) -> FusionStage:
        """Rerank the first stage's top-N by persona score, alone and fused (alpha on
        validation), and choose the deployed setting on validation."""
        started = time.perf_counter()
        self.fusion_stage = fuse_and_rerank(self.data, self.config, self.first_stage,
                                            self.cf_scores[self.first_stage], self.text_scores["persona max-sim"],
                                            self.text_scores["dense single-vector"])
        self.ceilings = self.fusion_stage.ceilings
        self.results += self.fusion_stage.results
        self.choose_fusion()
        self._step("reranking and fusion", started)
        return self.fusion_stage

    def choose_fusion(self) -> MethodResult:
        """The deployed configuration (see :func:`choose_fusion`), recorded in the choices."""
        self.fusion, self.choices["fusion"] = choose_fusion(self.results, self.first_stage)
        return self.fusion

    def recommender(self) -> Any:
        """The chosen configuration as a service would run it: a
        :class:`persona4rec.Recommender` over the train-only personas (item ids as in the
        data), the first stage's fitted model as its retriever, alpha and depth as chosen on
        validation, the adapter if any. Latency and the example users go through it."""
        from persona4rec.evaluation.baselines import CFRetriever
        from persona4rec.recommender import Recommender

        if getattr(self, "_recommender", None) is None:
            index = make_index(self.personas, self.data.item_ids)
            retriever = CFRetriever(self.cf_models[self.first_stage], self.data.item_ids)
            self._recommender = Recommender(self.profiler, index, retriever=retriever,
                                            alpha=self.fusion.params["alpha"], rerank_depth=self.fusion_depth,
                                            adapter=self.adapter)
        return self._recommender

    @property
    def fusion_depth(self) -> int | None:
        """Candidates the chosen fusion reranks (None: the full catalog)."""
        setting = self.fusion.setting
        return int(setting.split("@")[1]) if "@" in setting else None

    # ----------------------------------------------------------------- latency
    def measure_latency(self) -> dict[str, dict[str, float]]:
        """Per-user online latency (single thread): history in, top-10 ids out."""
        started = time.perf_counter()
        d, c = self.data, self.config
        rng = np.random.default_rng(c.seed)
        picks = rng.choice(len(d.eval_users), size=min(c.latency_users, len(d.eval_users)), replace=False)
        history = d.test_history
        n_items = len(d.item_ids)
        pop = self.cf_models["popularity"].counts.astype(np.float64)
        knn = self.cf_models["ItemKNN"].similarity
        ease = self.cf_models["EASE"].weights
        bpr = self.cf_models["BPR"]
        bpr_users = bpr.fold_in(history, d.eval_users)
        base_name = self.first_stage

        def top10(scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
            scores[seen] = -np.inf
            part = np.argpartition(-scores, 10)[:10]
            return part[np.argsort(-scores[part], kind="stable")]

        def cf_row(name: str, pos: int, seen: np.ndarray) -> np.ndarray:
            if name == "popularity":
                return pop.copy()
            if name == "BPR":
                return bpr_users[pos] @ bpr.item_factors.T + bpr.item_bias
            matrix = knn if name == "ItemKNN" else ease
            return matrix[seen].sum(axis=0, dtype=np.float64)

        def profile(pos: int) -> np.ndarray:
            return self.profile(self.test_history_rows[pos])

        def run_cf(name: str) -> Callable[[int], Any]:
            def f(pos: int) -> Any:
                seen = history.indices[history.indptr[d.eval_users[pos]]:history.indptr[d.eval_users[pos] + 1]]
                return top10(cf_row(name, pos, seen), seen)
            return f

        def run_dense(pos: int) -> Any:
            seen = history.indices[history.indptr[d.eval_users[pos]]:history.indptr[d.eval_users[pos] + 1]]
            return top10((self.item_vectors @ profile(pos)).astype(np.float64), seen)

        def run_index(index: Any) -> Callable[[int], Any]:
            def f(pos: int) -> Any:
                seen = history.indices[history.indptr[d.eval_users[pos]]:history.indptr[d.eval_users[pos] + 1]]
                return index.search(profile(pos), k=10, exclude=seen.tolist())
            return f

        recommender = self.recommender()

        def run_fused(pos: int) -> Any:
            # The service path: history records in, explained top-10 out (Recommender.recommend).
            return recommender.recommend(self.history(self.test_history_rows[pos]), k=10)

        runs = {"popularity": run_cf("popularity"), "ItemKNN": run_cf("ItemKNN"), "EASE": run_cf("EASE"),
                "BPR": run_cf("BPR"), "dense single-vector": run_dense,
                "persona max-sim": run_index(self.persona_index), "review max-sim": run_index(self.review_index),
                f"fused persona + {base_name} {self.fusion.setting} (Recommender.recommend)": run_fused}
        latency = {}
        for name, fn in runs.items():
            for pos in picks[:20]:
                fn(int(pos))  # warm caches and lazy paths
            samples = []
            for pos in picks:
                t = time.perf_counter_ns()
                fn(int(pos))
                samples.append((time.perf_counter_ns() - t) / 1000.0)
            latency[name] = {"median_us": round(float(np.median(samples)), 1),
                             "p95_us": round(float(np.percentile(samples, 95)), 1), "users": len(samples)}
        self.latency = latency
        self.latency_note = (f"single thread, {len(picks)} test users, includes profile building (cached review "
                             f"embeddings), scoring, history exclusion and top-10 selection over {n_items} items; "
                             "BPR user factors are precomputed (fold-in not timed) except in the Recommender row, "
                             "which times the whole service call (first stage incl. any BPR fold-in, rerank, "
                             "explanations of the 10 items)")
        # Every test user, not a sample: the served lists must be the measured ones.
        self.recommender_agreement = self._recommender_agreement(np.arange(len(d.test_users)))
        self._step("latency", started)
        return latency

    # -------------------------------------------------------------- examples
    def harness_top(self, pos: int, k: int = 10) -> np.ndarray:
        """The headline configuration's top-``k`` item positions for test user ``pos``, as
        the harness scored it (score matrices; what the test metrics were computed from)."""
        base = self.cf_scores[self.first_stage]["test"][pos:pos + 1]
        persona = self.text_scores["persona max-sim"]["test"][pos:pos + 1]
        alpha = self.fusion.params["alpha"]
        depth = self.fusion_depth
        if depth is None:
            return candidate_lists(fuse(persona, base, alpha), k)[0]
        return fused_rerank(candidate_lists(base, depth), persona, base, alpha)[0, :k]

    def _recommender_agreement(self, picks: np.ndarray) -> dict[str, Any]:
        """Does the served Recommender give the lists the harness measured? Share of sampled
        test users with the same top-10 (in order), and the mean top-10 overlap."""
        d = self.data
        recommender = self.recommender()
        position = {item: i for i, item in enumerate(d.item_ids)}
        same, overlap = 0, []
        for pos in picks:
            pos = int(pos)
            served = [position[i] for i in recommender.recommend(self.history(self.test_history_rows[pos]), k=10).item_ids]
            measured = [int(i) for i in self.harness_top(pos) if i >= 0]
            same += served == measured
            overlap.append(len(set(served) & set(measured)) / max(1, len(measured)))
        return {"users": len(picks), "same_top10": round(same / max(1, len(picks)), 4),
                "mean_top10_overlap": round(float(np.mean(overlap)) if overlap else 0.0, 4),
                "note": "Recommender.recommend vs the harness's score matrices for the headline configuration"}

    def examples(self) -> list[dict[str, Any]]:
        """For a few test users: history, and the served top-5 (Recommender.recommend, the
        headline configuration) with each item's matched persona."""
        d, c = self.data, self.config
        rng = np.random.default_rng(c.seed + 1)
        chosen = rng.choice(len(d.eval_users), size=min(c.show_users, len(d.eval_users)), replace=False)
        recommender = self.recommender()
        out = []
        for pos in chosen:
            pos = int(pos)
            served = recommender.recommend(self.history(self.test_history_rows[pos]), k=5)
            target = d.item_ids[int(d.test_targets[pos])]
            recs = [{"rank": rank, "item_id": item, "title": d.item_title(d.item_ids.index(item)),
                     "persona": name, "persona_id": pid, "persona_description": description, "rationale": why,
                     "is_held_out_item": item == target}
                    for rank, (item, pid, name, description, why) in enumerate(
                        zip(served.item_ids, served.persona_ids, served.persona_names, served.descriptions,
                            served.rationales), 1)]
            history = [{"item_id": d.item_ids[int(d.review_item[r])], "title": d.item_title(int(d.review_item[r])),
                        "review_title": str(d.reviews.title[r])} for r in self.test_history_rows[pos][-5:]]
            out.append({"user_id": d.user_ids[int(d.eval_users[pos])], "recent_history": history,
                        "held_out": {"item_id": target, "title": d.item_title(int(d.test_targets[pos]))},
                        "recommendations": recs})
        return out

    # ---------------------------------------------------------------- summary
    def summarise(self) -> dict[str, Any]:
        """The report dictionary: metrics with CIs, p-values, scenarios, latency, choices."""
        started = time.perf_counter()
        d, c = self.data, self.config
        methods = []
        per_user: dict[str, dict[str, np.ndarray]] = {}
        for r in self.results:
            key = f"{r.name} [{r.setting}]"
            test_metrics = per_user_metrics(r.test_ranks, c.cutoffs)
            valid_metrics = per_user_metrics(r.valid_ranks, c.cutoffs)
            per_user[key] = test_metrics
            entry: dict[str, Any] = {"method": r.name, "setting": r.setting, "params": r.params, "test": {},
                                     "valid": {m: round(float(v.mean()), 5) for m, v in valid_metrics.items()}}
            for m, values in test_metrics.items():
                entry["test"][m] = {"mean": round(float(values.mean()), 5)}
                if m in CI_METRICS:
                    _, low, high = bootstrap_ci(values, c.n_bootstrap, seed=c.seed)
                    entry["test"][m]["ci95"] = [round(low, 5), round(high, 5)]
            methods.append(entry)
        # The headline row first: the fused configuration chosen on validation.
        headline_key = (self.fusion.name, self.fusion.setting)
        methods.sort(key=lambda m: (m["method"], m["setting"]) != headline_key)
        methods[0]["headline"] = True
        users_train = np.diff(d.train_matrix.indptr)[d.eval_users]
        item_pop = np.asarray(d.train_matrix.sum(axis=0)).ravel()
        by_pop = np.lexsort((np.arange(len(item_pop)), -item_pop))
        fifth = max(1, int(round(0.2 * len(item_pop))))
        head, tail = np.zeros(len(item_pop), bool), np.zeros(len(item_pop), bool)
        head[by_pop[:fifth]] = True
        tail[by_pop[-fifth:]] = True
        groups = {
            "warm users (top 20% by train reviews)": users_train >= np.quantile(users_train, 0.8),
            "cold users (bottom 20% by train reviews)": users_train <= np.quantile(users_train, 0.2),
            "head items (target in top 20% by train popularity)": head[d.test_targets],
            "tail items (target in bottom 20% by train popularity)": tail[d.test_targets],
        }
        scenarios = {g: {"users": int(mask.sum()),
                         "ndcg@10": {k: round(float(v["NDCG@10"][mask].mean()), 5) for k, v in per_user.items()}}
                     for g, mask in groups.items()}
        full_first = f"{self.first_stage} [full]"
        comparisons = [("persona max-sim [full]", "dense single-vector [full]"),
                       ("persona max-sim, per-count offset [full]", "dense single-vector [full]"),
                       ("persona soft-max [full]", "dense single-vector [full]"),
                       ("review max-sim [full]", "dense single-vector [full]"),
                       (f"fused persona + {self.first_stage} [full]", full_first)]
        for n in c.candidate_sizes:
            comparisons.append((f"persona max-sim rerank [rerank@{n}]", f"dense single-vector rerank [rerank@{n}]"))
            comparisons.append((f"fused persona + {self.first_stage} [rerank@{n}]", full_first))
        headline = f"{self.fusion.name} [{self.fusion.setting}]"
        comparisons.sort(key=lambda ab: ab != (headline, full_first))  # the headline comparison first
        pvalues = []
        for a, b in comparisons:
            x, y = per_user[a]["NDCG@10"], per_user[b]["NDCG@10"]
            pvalues.append({"a": a, "b": b, "metric": "NDCG@10", "mean_a": round(float(x.mean()), 5),
                            "mean_b": round(float(y.mean()), 5),
                            "p_value": round(paired_bootstrap_pvalue(x, y, seed=c.seed), 5)})
        # Holm over the whole reported family: with this many comparisons one raw p < 0.05 is expected by chance.
        for entry, adjusted in zip(pvalues, holm_adjust([p["p_value"] for p in pvalues])):
            entry["p_holm"] = round(float(adjusted), 5)
        by_count = self.by_persona_count(per_user)
        self._step("statistics", started)
        return {
            "version": 1,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(c).items()},
            "encoder": getattr(self.encoder, "identity", {"fingerprint": self.encoder.fingerprint}),
            "dataset": self.dataset_stats,
            "protocol": {"split": d.split.describe(), "protocol": d.split.protocol,
                         "tie_break": d.split.tie_break, "seed": d.split.seed,
                         "valid_users": len(d.valid_users), "test_users": len(d.test_users),
                         "selection": "every choice on validation NDCG@10; test reported once",
                         "p_values": "paired bootstrap over test users; p_holm: Holm-corrected over the family",
                         "full_ranking": "all items except the user's history",
                         "rerank": "first stage top-N reordered; misses outside the list count as misses"},
            "choices": self.choices,
            "headline": {"method": self.fusion.name, "setting": self.fusion.setting,
                         "alpha": self.fusion.params["alpha"], "first_stage": self.first_stage,
                         "chosen_by": "best validation NDCG@10 among the fused settings"},
            "rerank_ceiling_hr": {str(n): v for n, v in self.ceilings.items()},
            # Every CF method's top-N hit rate: the ceiling it would give as a first stage.
            "candidate_hit_rate": {r.name: {str(n): round(float((r.test_ranks <= n).mean()), 5)
                                            for n in c.candidate_sizes}
                                   for r in self.results if r.setting == "full" and r.name in self.cf_scores},
            "methods": methods,
            "p_values": pvalues,
            "scenarios": scenarios,
            "by_persona_count": by_count,
            "latency": {"per_user": self.latency, "note": self.latency_note},
            "recommender_agreement": getattr(self, "recommender_agreement", None),
            "personas": {"n_items": self.personas.n_items, "n_personas": self.personas.n_personas,
                         "mean_per_item": round(self.personas.n_personas / self.personas.n_items, 3)},
            "examples": self.examples(),
            "timings_s": self.timings,
        }

    def by_persona_count(self, per_user: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        """Test NDCG@10 of the text methods grouped by the target item's persona count, and
        the mean max-sim excess over the single vector by persona count (training data)."""
        d = self.data
        counts = np.diff(self.personas.offsets)[d.test_targets]
        names = ["dense single-vector [full]", "persona max-sim [full]", "persona max-sim, per-count offset [full]",
                 "persona soft-max [full]"]
        groups = {}
        for c in sorted(set(counts.tolist())):
            mask = counts == c
            groups[str(c)] = {"users": int(mask.sum()),
                              "ndcg@10": {n: round(float(per_user[n]["NDCG@10"][mask].mean()), 5) for n in names}}
        return {"by_target_persona_count": groups,
                "max_sim_excess_over_single_vector_by_count": self.persona_count_excess,
                "items_by_persona_count": {str(c): int(n) for c, n in
                                           zip(*np.unique(np.diff(self.personas.offsets), return_counts=True))}}

    def run(self, reviews: ReviewTable | None = None, items: ItemTable | None = None) -> dict[str, Any]:
        """Every step in order; returns the report dictionary."""
        self.load(reviews, items)
        self.encode_texts()
        self.build_item_side()
        self.build_profiles()
        self.choose_persona_count()
        self.build_indexes()
        self.fit_baselines()
        self.score_text()
        self.fuse_and_rerank()
        self.measure_latency()
        report = self.summarise()
        report["timings_s"]["total"] = round(time.perf_counter() - self._t0, 1)
        return report


# ------------------------------------------------------------------ scoring steps


@dataclass
class CFStage:
    """Output of :func:`fit_cf_baselines`: each CF model chosen on validation."""

    models: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]]  # name -> phase -> history-excluded scores
    first_stage: str  # the CF method with the best validation NDCG@10 (popularity excluded)
    choices: dict[str, Any]
    results: list[MethodResult]


def fit_cf_baselines(data: Prepared, config: EvaluationConfig,
                     step: Callable[[str, float], Any] | None = None) -> CFStage:
    """Popularity, ItemKNN, EASE (grids through :func:`choices.choose_cf`) and BPR (grid x
    epoch checkpoints), all fitted on train and chosen on validation NDCG@10."""
    step = step or (lambda name, started: None)
    valid, test = data.phase("valid"), data.phase("test")
    models: dict[str, Any] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    choices: dict[str, Any] = {}
    results: list[MethodResult] = []

    def record(name: str, chosen: CFChoice) -> None:
        test_scores = chosen.test_scores if chosen.test_scores is not None else phase_scores(chosen.model, test)
        models[name] = chosen.model
        scores[name] = {"valid": chosen.valid_scores, "test": test_scores}
        choices[name] = {"params": chosen.params, "valid_ndcg@10": round(float(chosen.valid_ndcg), 5)}
        results.append(MethodResult(name, "full", ranks_from_scores(chosen.valid_scores, valid.targets),
                                    ranks_from_scores(test_scores, test.targets), chosen.params))

    for name, grid, make in (("popularity", [{}], lambda **p: bl.Popularity()),
                             ("ItemKNN", config.itemknn_grid, lambda **p: bl.ItemKNN(**p)),
                             ("EASE", config.ease_grid, lambda **p: bl.EASE(**p))):
        started = time.perf_counter()
        record(name, choose_cf(make, grid, data.train_matrix, valid))
        step(f"{name} (grid of {len(grid)} on validation)", started)
    started = time.perf_counter()
    best: CFChoice | None = None
    for params in config.bpr_grid:
        model = bl.BPR(seed=config.seed, **params).start(data.train_matrix)
        for epoch in range(BPR_EVAL_EVERY, config.bpr_max_epochs + 1, BPR_EVAL_EVERY):
            model.train_epochs(BPR_EVAL_EVERY)
            valid_scores = phase_scores(model, valid)
            value = mean_ndcg10(valid_scores, valid.targets)
            if best is None or value > best.valid_ndcg:
                # Keep the evaluated weights themselves: scoring folds users in with the shared
                # numba RNG, so a refit with the same seed would not reproduce this model.
                kept = copy.deepcopy(model)
                kept.epochs = epoch
                best = CFChoice({**params, "epochs": epoch}, kept, value, valid_scores)
    if best is None:
        raise ValueError("the BPR grid is empty")
    record("BPR", best)
    step(f"BPR (grid of {len(config.bpr_grid)} x {config.bpr_max_epochs // BPR_EVAL_EVERY} epoch counts)", started)
    order = ["popularity", "ItemKNN", "EASE", "BPR"]
    valid_ndcg = {n: mean_ndcg10(scores[n]["valid"], valid.targets) for n in order}
    first_stage = max(order[1:], key=lambda n: valid_ndcg[n])
    choices["first_stage"] = {"method": first_stage, "valid_ndcg@10": valid_ndcg}
    return CFStage(models, scores, first_stage, choices, results)


@dataclass
class TextStage:
    """Output of :func:`score_text_methods`."""

    scores: dict[str, dict[str, np.ndarray]]  # method -> phase -> history-excluded scores
    results: list[MethodResult]
    calibration: dict[str, Any]  # per-count offsets, the soft-max temperature and its curve
    persona_count_excess: dict[str, float]


def score_text_methods(data: Prepared, config: EvaluationConfig, profiles: dict[str, np.ndarray],
                       item_vectors: np.ndarray, personas: PersonaSet, persona_index: Any,
                       review_personas: PersonaSet, review_index: Any) -> TextStage:
    """Full-catalog text scores: dense single vector, persona max-sim through the index,
    every-review max-sim, and two calibrated persona scores that do not grow with an item's
    persona count.

    The max over P personas rises with P even when no persona fits better (a max of more
    noisy cosines), which pushes items with few reviews (one persona) down.
    * per-count offset: subtract, for items with c personas, the mean excess of max-sim over
      the item's single vector, measured on training data only (validation users' profiles
      from train histories, train-built items; no target is looked at);
    * soft maximum: ``T * log(mean_p exp(s_p / T))`` (log-mean-exp: the max as T -> 0, the
      mean as T grows; the mean keeps it from rising with P), T chosen on validation.
    """
    phases = ("valid", "test")
    scores: dict[str, dict[str, np.ndarray]] = {}
    for phase in phases:
        ph = data.phase(phase)
        scores.setdefault("dense single-vector", {})[phase] = exclude_history(
            profiles[phase] @ item_vectors.T, ph.history, ph.users)
        scores.setdefault("persona max-sim", {})[phase] = index_scores(persona_index, profiles[phase], ph.history,
                                                                      ph.users)
        scores.setdefault("review max-sim", {})[phase] = index_scores(review_index, profiles[phase], ph.history,
                                                                     ph.users)
    params: dict[str, dict[str, Any]] = {
        "dense single-vector": {"item": "mean of train review embeddings"},
        "persona max-sim": {"source": personas.params.get("method"),
                            "max_personas": personas.params.get("max_personas", config.max_personas),
                            "reviews_per_persona": config.reviews_per_persona, "n_personas": personas.n_personas},
        "review max-sim": {"n_personas": review_personas.n_personas}}

    counts = np.diff(personas.offsets)
    starts = personas.offsets[:-1]
    per_persona = {p: profiles[p] @ personas.vectors.T for p in phases}
    excess = np.maximum.reduceat(per_persona["valid"], starts, axis=1) - profiles["valid"] @ item_vectors.T
    offsets = {int(c): float(excess[:, counts == c].mean()) for c in np.unique(counts)}
    offset_of_item = np.array([offsets[int(c)] for c in counts])
    count_excess = {str(c): round(v, 5) for c, v in offsets.items()}
    scores["persona max-sim, per-count offset"] = {
        p: scores["persona max-sim"][p] - offset_of_item[None, :] for p in phases}

    def soft(phase: str, temperature: float) -> np.ndarray:
        s = per_persona[phase].astype(np.float64) / temperature
        top = np.maximum.reduceat(s, starts, axis=1)
        shifted = np.exp(s - np.repeat(top, counts, axis=1))
        lme = temperature * (top + np.log(np.add.reduceat(shifted, starts, axis=1) / counts[None, :]))
        ph = data.phase(phase)
        return exclude_history(lme, ph.history, ph.users)

    curve = {f"{t:g}": round(mean_ndcg10(soft("valid", t), data.valid_targets), 5)
             for t in config.softmax_temperatures}
    best_t = max(config.softmax_temperatures, key=lambda t: (curve[f"{t:g}"], t))
    scores["persona soft-max"] = {p: soft(p, best_t) for p in phases}
    params["persona max-sim, per-count offset"] = {"offset_by_persona_count": count_excess}
    params["persona soft-max"] = {"temperature": best_t, "valid_ndcg@10_by_temperature": curve}
    results = [MethodResult(name, "full", ranks_from_scores(s["valid"], data.valid_targets),
                            ranks_from_scores(s["test"], data.test_targets), params[name])
               for name, s in scores.items()]
    calibration = {"per_count_offset": count_excess,
                   "offset_measured_on": "validation users' train-history profiles x train-built items (no targets)",
                   "softmax_temperature": best_t, "valid_ndcg@10_by_temperature": curve}
    return TextStage(scores, results, calibration, count_excess)


@dataclass
class FusionStage:
    """Output of :func:`fuse_and_rerank`: rerank rows per depth and the fused rows."""

    results: list[MethodResult]
    ceilings: dict[int, dict[str, float]]  # depth -> phase -> first-stage hit rate


def fuse_and_rerank(data: Prepared, config: EvaluationConfig, first_stage: str, base: dict[str, np.ndarray],
                    persona: dict[str, np.ndarray], dense: dict[str, np.ndarray]) -> FusionStage:
    """Rerank the first stage's top-N by dense and persona scores, and fuse persona scores
    with the first stage's over its top-N and the full catalog, alpha chosen on validation
    for each depth (:func:`choices.choose_alpha`)."""
    targets = {"valid": data.valid_targets, "test": data.test_targets}
    results: list[MethodResult] = []
    ceilings: dict[int, dict[str, float]] = {}
    fused_name = f"fused persona + {first_stage}"
    for n in config.candidate_sizes:
        cands = {p: candidate_lists(base[p], n) for p in targets}
        ceilings[n] = {p: float(ceiling(cands[p], targets[p]).mean()) for p in targets}
        for name, text in (("dense single-vector", dense), ("persona max-sim", persona)):
            results.append(MethodResult(
                f"{name} rerank", f"rerank@{n}",
                *(ranks_from_lists(rerank(cands[p], text[p]), targets[p]) for p in ("valid", "test")),
                {"first_stage": first_stage}))
        alpha, curve = choose_alpha(lambda a: ranks_from_lists(
            fused_rerank(cands["valid"], persona["valid"], base["valid"], a), targets["valid"]), config.alpha_grid)
        results.append(MethodResult(
            fused_name, f"rerank@{n}",
            *(ranks_from_lists(fused_rerank(cands[p], persona[p], base[p], alpha), targets[p]) for p in ("valid", "test")),
            {"alpha": alpha, "first_stage": first_stage, "valid_ndcg@10_by_alpha": curve}))
    alpha, curve = choose_alpha(lambda a: ranks_from_scores(fuse(persona["valid"], base["valid"], a), targets["valid"]),
                                config.alpha_grid)
    results.append(MethodResult(
        fused_name, "full", *(ranks_from_scores(fuse(persona[p], base[p], alpha), targets[p]) for p in ("valid", "test")),
        {"alpha": alpha, "first_stage": first_stage, "valid_ndcg@10_by_alpha": curve}))
    return FusionStage(results, ceilings)


def choose_fusion(results: Sequence[MethodResult], first_stage: str) -> tuple[MethodResult, dict[str, Any]]:
    """The deployed configuration: the fused setting (rerank depth or full, each with its own
    alpha) with the best validation NDCG@10; on a tie the shallower rerank, the cheaper one to
    serve. Test ranks play no part."""
    fused = [r for r in results if r.name == f"fused persona + {first_stage}"]
    if not fused:
        raise ValueError(f"no fused results for first stage {first_stage!r}; run fuse_and_rerank first")
    depth = {r.setting: (int(r.setting.split("@")[1]) if "@" in r.setting else 10**9) for r in fused}
    valid = {r.setting: float(ndcg_at(r.valid_ranks, 10).mean()) for r in fused}
    chosen = max(fused, key=lambda r: (round(valid[r.setting], 10), -depth[r.setting]))
    return chosen, {"setting": chosen.setting, "alpha": chosen.params["alpha"], "first_stage": first_stage,
                    "valid_ndcg@10_by_setting": {k: round(v, 5) for k, v in valid.items()}}


def make_index(personas: PersonaSet, item_ids: Sequence[str] | None = None) -> Any:
    """A :class:`persona4rec.PersonaIndex` over dense item positions (or ``item_ids``), with
    persona texts (and rationales where the personas have them)."""
    from persona4rec.index import PersonaIndex

    rationales = getattr(personas, "rationales", None) or [""] * personas.n_personas
    records = [{"persona_id": f"{personas.item_ids[i]}_E{p - personas.offsets[i] + 1}",
                "name": personas.names[p], "description": personas.descriptions[p], "rationale": rationales[p]}
               for i in range(personas.n_items) for p in personas.personas_of(i)]
    ids = np.arange(personas.n_items, dtype=np.int64) if item_ids is None else list(item_ids)
    return PersonaIndex.build(ids, personas.vectors, personas.offsets, personas=records)


def index_scores(index: Any, profiles: np.ndarray, history: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """Full users x items score matrix from the index's exact search (history items -inf)."""
    n_items = index.n_items
    exclude = [history.indices[history.indptr[u]:history.indptr[u + 1]].tolist() for u in users]
    ids, scores = index.search(np.ascontiguousarray(profiles, dtype=np.float32), k=n_items, exclude=exclude)
    out = np.full((len(users), n_items), -np.inf)
    valid = ids >= 0
    rows = np.repeat(np.arange(len(users)), ids.shape[1]).reshape(ids.shape)
    out[rows[valid], ids[valid]] = scores[valid]
    return out
