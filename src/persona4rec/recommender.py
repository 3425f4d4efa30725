"""One object from a user's history to explained recommendations: :class:`Recommender`.

It composes the parts every caller used to glue by hand:

* a :class:`persona4rec.UserProfiler` (with its encoder and interaction cache) that turns
  a history into a profile vector, optionally mapped by a trained adapter (``adapter``:
  anything with ``apply(vector)``, e.g. :class:`persona4rec.train.adapter.Adapter`);
* a persona index: a :class:`persona4rec.PersonaIndex`, or any object with the same
  ``search(vec, k, exclude=, return_personas=True)``, ``rerank(vec, ids, base_scores=,
  alpha=, unknown=)`` and ``explain(vec, item_id)`` methods (a sharded index plugs in);
* optionally a first-stage ``retriever``: anything with ``recommend(history_item_ids, k,
  exclude_seen) -> (item_ids, scores)`` (the CF baselines through
  :class:`persona4rec.evaluation.baselines.CFRetriever`);
* the fusion settings: ``alpha`` (weight of the persona score; the first stage's scores
  are min-max scaled over its list, as ``PersonaIndex.rerank`` serves) and
  ``rerank_depth`` (how many first-stage candidates are reranked; None: all it returns).

Without a retriever the index's exact search ranks the whole catalog by persona
max-sim. Every result names the matched persona of each item (its id, name and
rationale), the explanation to show.

``save(folder)`` writes ``recommender.json`` (settings), ``index.p4r`` (the index's own
format) and, when present, the adapter and the retriever in their own ``.npz`` files; no
pickle anywhere. ``load(folder, encoder)`` rebuilds it around the given encoder.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from persona4rec.profile import TEMPLATES, EmptyHistoryError, Interaction, UserProfiler

FORMAT_NAME = "persona4rec.recommender"
FORMAT_VERSION = 1
_SETTINGS_FILE = "recommender.json"
_INDEX_FILE = "index.p4r"


@dataclass(frozen=True)
class Recommendation:
    """Recommendations for one user, best first.

    ``scores`` is what the list is sorted by (the fused score with a retriever, else the
    persona max-sim score); ``persona_scores`` the matched persona's own score;
    ``persona_ids``/``persona_names``/``rationales`` explain each item (empty strings
    where the index holds no text). ``source`` says how the list was made: ``"personas"``,
    ``"fused"``, or ``"retriever"`` (a user without a usable history, ranked by the first
    stage alone).
    """

    item_ids: list
    scores: np.ndarray
    persona_scores: np.ndarray
    persona_ids: list[str]
    persona_names: list[str]
    rationales: list[str]
    source: str = "personas"
    descriptions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per recommended item."""
        return [{"rank": r + 1, "item_id": self.item_ids[r], "score": float(self.scores[r]),
                 "persona_id": self.persona_ids[r], "persona_name": self.persona_names[r],
                 "rationale": self.rationales[r]} for r in range(len(self.item_ids))]


class Recommender:
    """History in, explained top-k out (see the module docstring)."""

    def __init__(self, profiler: UserProfiler, index: Any, *, retriever: Any = None, alpha: float = 1.0,
                 rerank_depth: int | None = 100, adapter: Any = None, fallback_to_all_ratings: bool = True) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (weight of the persona score), got {alpha}")
        if rerank_depth is not None and (int(rerank_depth) != rerank_depth or rerank_depth < 1):
            raise ValueError(f"rerank_depth must be a positive int or None (rerank all candidates), got {rerank_depth}")
        for method in ("search", "rerank", "explain"):
            if not callable(getattr(index, method, None)):
                raise TypeError(f"index must have a {method}() method like persona4rec.PersonaIndex; "
                                f"got {type(index).__name__}")
        if retriever is not None and not callable(getattr(retriever, "recommend", None)):
            raise TypeError("retriever must have recommend(history_item_ids, k, exclude_seen) -> (ids, scores)")
        if adapter is not None and not callable(getattr(adapter, "apply", None)):
            raise TypeError("adapter must have apply(vector) -> vector (e.g. persona4rec.train.adapter.Adapter)")
        self.profiler = profiler
        self.index = index
        self.retriever = retriever
        self.alpha = float(alpha)
        self.rerank_depth = None if rerank_depth is None else int(rerank_depth)
        self.adapter = adapter
        self.fallback_to_all_ratings = fallback_to_all_ratings
        # A user whose every interaction is rated below min_rating is profiled from all of
        # them (what the evaluation harness measured), not refused.
        self._all_ratings = None
        if fallback_to_all_ratings and profiler.min_rating is not None:
            self._all_ratings = UserProfiler(profiler.encoder, cache=profiler.cache, k=profiler.k,
                                             gamma=profiler.gamma, min_rating=None, template=profiler.template,
                                             transform=profiler.transform, batch_size=profiler.batch_size)

    def __repr__(self) -> str:
        stage = type(self.retriever).__name__ if self.retriever is not None else "none"
        return (f"Recommender(index={type(self.index).__name__}, retriever={stage}, alpha={self.alpha:.2f}, "
                f"rerank_depth={self.rerank_depth}, adapter={'yes' if self.adapter is not None else 'no'})")

    # ---------------------------------------------------------------- pieces
    def seen_items(self, history: Iterable[Any]) -> list:
        """Item ids of a history's entries (Interaction.item_id, or the template's item field)."""
        out = []
        for entry in history:
            if isinstance(entry, Interaction):
                item = entry.item_id
            elif isinstance(entry, Mapping):
                item = self.profiler.template(entry).item_id
            else:
                item = None
            if item is not None:
                out.append(item)
        return out

    def profile(self, history: Sequence[Any]) -> np.ndarray | None:
        """The user's profile (adapter applied), or None when the history has nothing usable.

        Built by ``profile_many`` (a batch of one), the path the evaluation harness builds
        its profiles with: the single-user path may differ in the last float bit, and int8
        quantization of the query can turn that into a different score, so only the same
        path guarantees that what is served is what was measured."""
        vector = None
        for profiler in (self.profiler, self._all_ratings):
            if profiler is None:
                break
            batch = profiler.profile_many([history])
            if len(batch.positions):
                vector = batch.vectors[0]
                break
        if vector is None:
            return None
        return np.asarray(self.adapter.apply(vector), dtype=np.float32) if self.adapter is not None else vector

    def _explained(self, vector: np.ndarray, item_ids: Sequence, scores: np.ndarray, persona_scores: np.ndarray,
                   persona_ids: Sequence, source: str) -> Recommendation:
        names, rationales, descriptions = [], [], []
        for item, pid in zip(item_ids, persona_ids):
            match = next((m for m in self.index.explain(vector, item) if m.persona_id == pid), None)
            names.append(match.name if match else "")
            rationales.append(match.rationale if match else "")
            descriptions.append(match.description if match else "")
        return Recommendation(list(item_ids), np.asarray(scores, dtype=np.float32),
                              np.asarray(persona_scores, dtype=np.float32), [str(p) for p in persona_ids],
                              names, rationales, source, descriptions)

    # ------------------------------------------------------------- recommend
    def recommend(self, history: Sequence[Any], k: int = 10, exclude_seen: bool = True) -> Recommendation:
        """Top-``k`` items for one user's ``history`` (what :class:`UserProfiler` takes:
        :class:`persona4rec.profile.Interaction` objects, raw records its template renders,
        or texts), best first, each with its matched persona.

        ``exclude_seen`` drops the history's items (by ``Interaction.item_id`` / the
        template's item field). A history with nothing usable is ranked by the retriever
        alone (``source="retriever"``, no personas); without a retriever it raises
        :class:`persona4rec.EmptyHistoryError`.
        """
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive int, got {k}")
        history = list(history)
        seen = self.seen_items(history) if exclude_seen else []
        vector = self.profile(history)
        if vector is None:
            if self.retriever is None:
                raise EmptyHistoryError("no usable interaction in the history and no retriever to fall back to; "
                                        "pass a retriever (e.g. popularity) for users without history")
            ids, scores = self.retriever.recommend(seen, k=k, exclude_seen=exclude_seen)
            n = min(k, len(ids))
            return Recommendation(list(ids[:n]), np.asarray(scores[:n], np.float32), np.zeros(n, np.float32),
                                  [""] * n, [""] * n, [""] * n, "retriever", [""] * n)
        if self.retriever is None:
            ids, scores, personas = self.index.search(vector, k=int(k), exclude=seen, return_personas=True)
            return self._explained(vector, list(ids), scores, scores, list(personas), "personas")
        depth = self.rerank_depth or 10**9
        cand, base = self.retriever.recommend(seen, k=max(depth, int(k)) if self.rerank_depth else depth,
                                              exclude_seen=exclude_seen)
        cand, base = list(cand), np.asarray(base, dtype=np.float32)
        if not len(cand):
            return Recommendation([], np.zeros(0, np.float32), np.zeros(0, np.float32), [], [], [], "fused", [])
        result = self.index.rerank(vector, cand, base_scores=base, alpha=self.alpha, unknown="skip")
        n = min(int(k), len(result.ids))
        return self._explained(vector, result.ids[:n], result.scores[:n], result.persona_scores[:n],
                               result.persona_ids[:n], "fused")

    def recommend_batch(self, histories: Sequence[Sequence[Any]], k: int = 10,
                        exclude_seen: bool = True) -> list[Recommendation]:
        """:meth:`recommend` for many users; new interaction texts are encoded in one batch first."""
        histories = [list(h) for h in histories]
        try:  # warm the interaction cache in one encoder call; profiles then hit the cache
            self.profiler.profile_many(histories)
        except (ValueError, TypeError):
            pass  # recommend() raises the precise error for the offending history
        return [self.recommend(h, k=k, exclude_seen=exclude_seen) for h in histories]

    # ---------------------------------------------------------- persistence
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the settings (JSON), the index and the adapter/retriever files into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        template = next((name for name, t in TEMPLATES.items() if t == self.profiler.template), None)
        if template is None:
            raise ValueError("the profiler's template is not one of persona4rec.profile.TEMPLATES; a saved "
                             "recommender names its template, so build the profiler with template=<name>")
        if self.profiler.transform is not None:
            raise ValueError("the profiler has a transform, which cannot be saved; pass it as adapter= instead")
        if not callable(getattr(self.index, "save", None)):
            raise TypeError(f"{type(self.index).__name__} has no save(path); save it yourself and build on load")
        self.index.save(folder / _INDEX_FILE)
        settings: dict[str, Any] = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "alpha": self.alpha, "rerank_depth": self.rerank_depth,
            "fallback_to_all_ratings": self.fallback_to_all_ratings,
            "profiler": {"k": self.profiler.k, "gamma": self.profiler.gamma,
                         "min_rating": self.profiler.min_rating, "template": template},
            "encoder": getattr(self.profiler.encoder, "identity", {"fingerprint": self.profiler.encoder.fingerprint}),
            "index": {"file": _INDEX_FILE, "class": _class_path(self.index)},
        }
        for role, part in (("adapter", self.adapter), ("retriever", self.retriever)):
            if part is None:
                continue
            if not callable(getattr(part, "save", None)) or not callable(getattr(type(part), "load", None)):
                raise TypeError(f"the {role} ({type(part).__name__}) has no save(path)/load(path); it cannot be saved")
            part.save(folder / f"{role}.npz")
            settings[role] = {"file": f"{role}.npz", "class": _class_path(part)}
        (folder / _SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, encoder: Any, *, cache: Any = None, mmap: bool = True) -> "Recommender":
        """Rebuild a saved recommender around ``encoder`` (the one it was built with: the
        index checks the encoder's identity when it recorded one). ``cache`` is the
        profiler's interaction cache (None: the per-user default, False: memory only)."""
        folder = Path(folder)
        path = folder / _SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass a folder written by Recommender.save")
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); save the recommender again") from exc
        if settings.get("format") != FORMAT_NAME or settings.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} settings file "
                             f"(format {settings.get('format')!r}, version {settings.get('version')!r})")
        index = _load_part(settings["index"], folder, mmap=mmap)
        check = getattr(index, "check_encoder", None)
        if callable(check) and getattr(index, "encoder_identity", None):
            check(encoder)
        p = settings["profiler"]
        profiler = UserProfiler(encoder, cache=cache, k=int(p["k"]), gamma=float(p["gamma"]),
                                min_rating=p["min_rating"], template=p["template"])
        parts = {role: _load_part(settings[role], folder) for role in ("adapter", "retriever") if role in settings}
        return cls(profiler, index, alpha=settings["alpha"], rerank_depth=settings["rerank_depth"],
                   fallback_to_all_ratings=settings.get("fallback_to_all_ratings", True), **parts)


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _load_part(entry: Mapping[str, str], folder: Path, **kwargs: Any) -> Any:
    """Load one saved component by its recorded class: only persona4rec classes are
    imported (a settings file cannot make the loader import arbitrary code)."""
    module_name, _, class_name = str(entry["class"]).rpartition(".")
    if not module_name.startswith("persona4rec.") and module_name != "persona4rec":
        raise ValueError(f"refusing to load component class {entry['class']!r}: not a persona4rec class")
    component = getattr(importlib.import_module(module_name), class_name)
    return component.load(folder / entry["file"], **kwargs)
