"""Extractive personas: a multi-vector item representation that needs no LLM.

An item's train reviews are embedded and clustered with spherical k-means; each
cluster centroid (re-normalised) is one persona vector. A persona is named after the
title of its most central review (the review closest to the centroid) and described
by the titles of its most central reviews plus the opening phrase of the most central
review's text, so the explanation a user sees is always words real reviewers wrote.

Items with few reviews get fewer personas: ``P = clamp(n_reviews // reviews_per_persona,
1, max_personas)``, so no persona stands on a single review unless the item has only
one. Items without any review get one persona from a fallback vector (for example the
embedding of the item's title), named by the item title.

The output layout is the one :class:`persona4rec.PersonaIndex` takes: float32
L2-normalised rows grouped by item with CSR ``offsets`` (int64, ``n_items + 1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

FORMAT_VERSION = 1


@dataclass
class PersonaSet:
    """Personas of a catalog, grouped by item.

    ``vectors[offsets[i]:offsets[i + 1]]`` are the personas of ``item_ids[i]``;
    ``names``, ``descriptions`` and ``support`` (reviews per persona) are per persona row.
    ``central_reviews[p]`` lists the indices (into the review list the set was built
    from) of the persona's most central reviews, best first.
    """

    item_ids: list[str]
    vectors: np.ndarray
    offsets: np.ndarray
    names: list[str]
    descriptions: list[str]
    support: np.ndarray
    central_reviews: list[list[int]] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)
    rationales: list[str] = field(default_factory=list)  # per persona row (LLM personas); empty: none

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_personas(self) -> int:
        return int(self.offsets[-1])

    def item_of_persona(self) -> np.ndarray:
        """Item position of every persona row."""
        return np.repeat(np.arange(self.n_items), np.diff(self.offsets))

    def personas_of(self, item_position: int) -> range:
        return range(int(self.offsets[item_position]), int(self.offsets[item_position + 1]))

    def to_records(self) -> list[dict[str, object]]:
        """One JSON-serialisable record per persona (without the vector)."""
        owners = self.item_of_persona()
        return [
            {"version": FORMAT_VERSION, "item_id": self.item_ids[owners[p]],
             "persona_id": f"{self.item_ids[owners[p]]}_E{p - int(self.offsets[owners[p]]) + 1}",
             "name": self.names[p], "description": self.descriptions[p], "support": int(self.support[p])}
            for p in range(self.n_personas)
        ]


def personas_for(n_reviews: int, max_personas: int = 5, reviews_per_persona: int = 2) -> int:
    """How many personas an item with ``n_reviews`` train reviews gets."""
    if max_personas < 1 or reviews_per_persona < 1:
        raise ValueError("max_personas and reviews_per_persona must be at least 1")
    return int(min(max_personas, max(1, n_reviews // reviews_per_persona)))


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def spherical_kmeans(points: np.ndarray, k: int, seed: int = 0, max_iter: int = 30,
                     n_init: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit vectors by cosine similarity. Returns ``(centroids, labels)``.

    Each of ``n_init`` runs is seeded by k-means++ on cosine distance; the run with
    the highest total similarity of points to their centroids wins (one run alone
    often settles in a poor local optimum). Deterministic for a given ``seed``.
    """
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} for {n} points, got {k}")
    if k == n:
        return _normalise(points.copy()), np.arange(n)
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(max(1, n_init)):
        centroids, labels = _kmeans_once(points, k, rng, max_iter)
        objective = float((points * centroids[labels]).sum())
        if best is None or objective > best[0] + 1e-9:
            best = (objective, centroids, labels)
    return best[1], best[2]


def _kmeans_once(points: np.ndarray, k: int, rng: np.random.Generator,
                 max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(points)
    chosen = [int(rng.integers(n))]
    distance = 1.0 - points @ points[chosen[0]]
    for _ in range(1, k):
        weights = np.clip(distance, 0.0, None)
        total = weights.sum()
        nxt = int(rng.choice(n, p=weights / total)) if total > 1e-12 else int(rng.integers(n))
        chosen.append(nxt)
        distance = np.minimum(distance, 1.0 - points @ points[nxt])
    centroids = points[chosen].copy()
    labels = np.full(n, -1)
    for _ in range(max_iter):
        similarity = points @ centroids.T
        new_labels = similarity.argmax(axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        _reseed_empty_clusters(labels, similarity[np.arange(n), labels], k)
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = points[members].sum(axis=0)
        centroids = _normalise(centroids)
    return centroids, labels


def _reseed_empty_clusters(labels: np.ndarray, fit: np.ndarray, k: int) -> None:
    """Give each empty cluster its own point, in place: the worst-explained point of a
    cluster that keeps at least one member. (Re-seeding every empty cluster with the same
    point used to leave all but the last one empty when reviews were duplicates.) With
    fewer points than clusters some stay empty; callers drop empty clusters."""
    counts = np.bincount(labels, minlength=k)
    fit = fit.astype(np.float64).copy()
    for c in np.flatnonzero(counts == 0):
        donors = np.flatnonzero(counts[labels] > 1)
        if len(donors) == 0:
            return
        far = int(donors[fit[donors].argmin()])
        counts[labels[far]] -= 1
        labels[far] = c
        counts[c] = 1
        fit[far] = np.inf


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _opening_phrase(text: str, max_words: int = 20) -> str:
    first = _SENTENCE_END.split(text.strip(), maxsplit=1)[0] if text.strip() else ""
    words = first.split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


_WORD = re.compile(r"[a-z][a-z'-]+[a-z]")
# Words that say nothing about who a reviewer is or why they bought (plus review boilerplate).
_STOPWORDS = frozenset("""
a about above after again all also am an and any are aren't as at be because been before being below between both
but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each few for from further
get gets got had hadn't has hasn't have haven't having he her here hers herself him himself his how i i'd i'll i'm
i've if in into is isn't it it's its itself just let's me more most much my myself no nor not now of off on once
only or other ought our ours ourselves out over own same she should shouldn't so some such than that that's the
their theirs them themselves then there there's these they they're this those through to too under until up very
was wasn't we we're were weren't what when where which while who whom why will with won't would wouldn't you you're
your yours yourself yourselves one two three four five stars star really well good great nice fine okay ok love
like product item bought buy buying purchase purchased works work worked use used using thing things lot even still
get got make made way back first new will would could also something anything everything however though every many
always never since around enough another without within almost maybe sure quite pretty bit little want wanted need
others say said best simply real idea actually definitely highly recommend recommended far
""".split())


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and len(w) > 2]


class _Vocabulary:
    """Document frequencies of review words over the reviews a persona set is built from."""

    def __init__(self, docs: Sequence[set[str]]) -> None:
        self.n = max(1, len(docs))
        self.df: dict[str, int] = {}
        for doc in docs:
            for word in doc:
                self.df[word] = self.df.get(word, 0) + 1

    def idf(self, word: str) -> float:
        return float(np.log((1 + self.n) / (1 + self.df.get(word, 0))))


def _distinctive_terms(members: Sequence[int], item_rows: Sequence[int], docs: Sequence[set[str]],
                       vocab: _Vocabulary, n_terms: int = 5) -> list[str]:
    """Words many of the persona's reviews use, rare in the corpus, and more common in this
    persona than in the item's other reviews (so two personas of one item differ)."""
    in_cluster: dict[str, int] = {}
    for r in members:
        for word in docs[r]:
            in_cluster[word] = in_cluster.get(word, 0) + 1
    in_item: dict[str, int] = {}
    for r in item_rows:
        for word in docs[r]:
            in_item[word] = in_item.get(word, 0) + 1
    need = min(2, len(members))  # a word one reviewer of many used is not the group's
    # A word fewer than three reviewers of the whole corpus used is idiosyncratic, not a kind of reviewer.
    corpus_need = 3 if vocab.n >= 50 else 1
    scored = []
    for word, count in in_cluster.items():
        if count < need or vocab.df.get(word, 0) < corpus_need:
            continue
        share = count / len(members)
        lift = share / (in_item[word] / len(item_rows))
        scored.append((share * lift * vocab.idf(word), word))
    return [w for _, w in sorted(scored, key=lambda x: (-x[0], x[1]))[:n_terms]]


def _representative_sentence(ranked: Sequence[int], texts: Sequence[str], terms: Sequence[str],
                             vocab: _Vocabulary, max_words: int = 30) -> str:
    """The sentence of the persona's most central reviews that carries most of its
    distinctive words (idf-weighted), preferring complete sentences of 5-30 words."""
    best: tuple[float, int, str] | None = None
    weights = {t: vocab.idf(t) for t in terms}
    for rank, r in enumerate(ranked):
        for sentence in _SENTENCE_END.split(str(texts[r]).strip()):
            words = sentence.split()
            if not 5 <= len(words) <= max_words:
                continue
            present = set(_terms(sentence))
            score = sum(w for t, w in weights.items() if t in present)
            key = (score, -rank, sentence)
            if best is None or key[:2] > best[:2]:
                best = key
    if best is not None and best[0] > 0:
        return best[2]
    return _opening_phrase(str(texts[ranked[0]])) if len(ranked) else ""


def _persona_name(terms: Sequence[str], lead: str) -> str:
    """A label that reads as a kind of reviewer: their distinctive words, else the review title."""
    if len(terms) >= 2:
        shown = list(terms[:3])
        return "Reviewers who mention " + (", ".join(shown[:-1]) + " and " + shown[-1])
    if len(terms) == 1:
        return f"Reviewers who mention {terms[0]}"
    return lead


def extract_personas(
    item_ids: Sequence[str],
    review_item: np.ndarray,
    review_vectors: np.ndarray,
    review_titles: Sequence[str],
    review_texts: Sequence[str],
    *,
    max_personas: int = 5,
    reviews_per_persona: int = 2,
    fallback_vectors: np.ndarray | None = None,
    fallback_names: Sequence[str] | None = None,
    seed: int = 0,
    n_central: int = 3,
    label_style: str = "terms",
) -> PersonaSet:
    """Build extractive personas for every item in ``item_ids``.

    ``review_item[r]`` is the item position (into ``item_ids``) of review ``r``, whose
    embedding is ``review_vectors[r]`` (L2-normalised). Pass only the reviews the
    personas may see: in evaluation, train reviews only. ``fallback_vectors`` (one row
    per item) serve items without reviews; without them such an item is an error.

    ``label_style="terms"`` (default) names a persona by the distinctive words of its reviews
    ("Reviewers who mention tone, strings and tuner") and describes it by its most
    representative sentence, its distinctive words and its central review titles;
    ``label_style="titles"`` names it by its most central review's title (the earlier labels).
    """
    if label_style not in ("terms", "titles"):
        raise ValueError(f"label_style must be 'terms' or 'titles', got {label_style!r}")
    review_item = np.asarray(review_item, dtype=np.int64)
    review_vectors = np.asarray(review_vectors, dtype=np.float32)
    n_items = len(item_ids)
    if len(review_item) != len(review_vectors):
        raise ValueError("review_item and review_vectors must have one row per review")
    if len(review_item) and (review_item.min() < 0 or review_item.max() >= n_items):
        raise ValueError("review_item holds an item position outside 0..len(item_ids)-1")
    order = np.argsort(review_item, kind="stable")
    bounds = np.searchsorted(review_item[order], np.arange(n_items + 1))
    docs = [set(_terms(f"{review_titles[r]} {review_texts[r]}")) for r in range(len(review_item))] \
        if label_style == "terms" else []
    vocab = _Vocabulary(docs)
    vectors: list[np.ndarray] = []
    names: list[str] = []
    descriptions: list[str] = []
    support: list[int] = []
    central: list[list[int]] = []
    offsets = np.zeros(n_items + 1, dtype=np.int64)
    for item in range(n_items):
        rows = order[bounds[item]:bounds[item + 1]]
        if len(rows) == 0:
            if fallback_vectors is None:
                raise ValueError(f"item {item_ids[item]!r} has no reviews and no fallback vector was given")
            vectors.append(_normalise(np.asarray(fallback_vectors[item], dtype=np.float64))[None, :])
            title = fallback_names[item] if fallback_names is not None else str(item_ids[item])
            names.append(str(title))
            descriptions.append(f"Built from the item description: {title}")
            support.append(0)
            central.append([])
            offsets[item + 1] = offsets[item] + 1
            continue
        # Never more clusters than distinct review embeddings: six identical "Five Stars"
        # reviews make one persona, not five copies of it (or empty clusters).
        distinct = len(np.unique(np.round(review_vectors[rows], 5), axis=0))
        k = min(personas_for(len(rows), max_personas, reviews_per_persona), distinct)
        centroids, labels = spherical_kmeans(review_vectors[rows], k, seed=seed + item)
        # Larger clusters first: the persona most reviewers share leads the list; a cluster
        # k-means left empty (near-duplicate reviews) is dropped rather than named.
        kept = [c for c in range(k) if (labels == c).any()]
        for c in sorted(kept, key=lambda c: (-(labels == c).sum(), c)):
            members = rows[labels == c]
            closeness = review_vectors[members] @ centroids[c]
            ranked = members[np.argsort(-closeness, kind="stable")][:n_central]
            titles = [str(review_titles[r]).strip() for r in ranked if str(review_titles[r]).strip()]
            lead = titles[0] if titles else _opening_phrase(str(review_texts[ranked[0]]), 8)
            vectors.append(centroids[c][None, :])
            if label_style == "terms":
                terms = _distinctive_terms(members, rows, docs, vocab)
                by_closeness = members[np.argsort(-closeness, kind="stable")][:max(n_central, 5)]
                sentence = _representative_sentence(by_closeness, review_texts, terms, vocab)
                names.append(_persona_name(terms, lead))
                descriptions.append((f"\"{sentence}\" " if sentence else "") +
                                    (f"Distinctive words: {', '.join(terms)}. " if terms else "") +
                                    f"Review titles: {'; '.join(titles) or lead}.")
            else:
                phrase = _opening_phrase(str(review_texts[ranked[0]]))
                names.append(lead)
                descriptions.append(f"Reviewers who said: {'; '.join(titles) or lead}. " +
                                    (f"In their words: \"{phrase}\"" if phrase else ""))
            support.append(len(members))
            central.append([int(r) for r in ranked])
        offsets[item + 1] = offsets[item] + len(kept)
    stacked = _normalise(np.concatenate(vectors, axis=0)).astype(np.float32) if vectors else \
        np.zeros((0, review_vectors.shape[1]), dtype=np.float32)
    return PersonaSet(
        item_ids=[str(i) for i in item_ids], vectors=np.ascontiguousarray(stacked), offsets=offsets,
        names=names, descriptions=descriptions, support=np.asarray(support, dtype=np.int64),
        central_reviews=central,
        params={"method": "extractive-spherical-kmeans", "max_personas": max_personas,
                "reviews_per_persona": reviews_per_persona, "seed": seed, "labels": label_style},
    )


def mean_item_vectors(n_items: int, review_item: np.ndarray, review_vectors: np.ndarray,
                      fallback_vectors: np.ndarray | None = None) -> np.ndarray:
    """One L2-normalised vector per item: the mean of its reviews (fallback when it has none)."""
    review_item = np.asarray(review_item, dtype=np.int64)
    sums = np.zeros((n_items, review_vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, review_item, review_vectors)
    counts = np.bincount(review_item, minlength=n_items)
    empty = counts == 0
    if empty.any():
        if fallback_vectors is None:
            raise ValueError(f"{int(empty.sum())} item(s) have no reviews and no fallback vector was given")
        sums[empty] = fallback_vectors[empty]
    return _normalise(sums).astype(np.float32)


def load_persona_file(path: str) -> dict[str, list[dict[str, str]]]:
    """Read LLM personas (``3_personas.jsonl[.gz]`` rows: ``item_id`` and a ``personas``
    list of ``ID``/``Name``/``Description``/``Preference_Rationale``) into
    ``{item_id: [persona, ...]}``. Errors name the file, line and field.

    Records of the ``llm personas`` stage with ``status: "failed"`` (the model's answers
    failed validation twice; no personas) are skipped with a warning naming how many:
    those items keep their fallback personas, as items missing from the file do."""
    import warnings

    from persona4rec.data.loaders import iter_records
    from persona4rec.data.tables import DataFormatError

    out: dict[str, list[dict[str, str]]] = {}
    failed: list[str] = []
    for number, record in iter_records(path):
        where = f"{path}: line {number}"
        if record.get("status") == "failed":
            failed.append(str(record.get("item_id", f"line {number}")))
            continue
        if "item_id" not in record:
            raise DataFormatError(f"{where}: field 'item_id': missing (expected persona rows of the LLM stage)")
        personas = record.get("personas")
        if not isinstance(personas, list) or not personas:
            raise DataFormatError(f"{where}: field 'personas': expected a non-empty list of personas")
        rows = []
        for k, persona in enumerate(personas):
            if not isinstance(persona, dict) or not str(persona.get("Name", "")).strip():
                raise DataFormatError(f"{where}: field 'personas[{k}].Name': missing or empty")
            rows.append({"id": str(persona.get("ID", f"P{k + 1}")), "name": str(persona["Name"]).strip(),
                         "description": str(persona.get("Description", "")).strip(),
                         "rationale": str(persona.get("Preference_Rationale", "")).strip()})
        out[str(record["item_id"])] = rows
    if failed:
        warnings.warn(f"{path}: {len(failed)} failed persona record(s) skipped (e.g. {', '.join(failed[:3])}); "
                      "those items keep their fallback personas. Rerun `persona4rec llm personas ... "
                      "--retry-failed` to redo them.", stacklevel=2)
    return out


def persona_text(persona: dict[str, str]) -> str:
    """The text embedded for an LLM persona: name, description and rationale."""
    # The layout the LLM judge reads personas in (persona4rec.llm.stages): "Name. Description Rationale".
    body = " ".join(p for p in (persona["description"], persona.get("rationale", "")) if p)
    return f"{persona['name']}. {body}" if body else persona["name"]


def personas_from_file(item_ids: Sequence[str], by_item: dict[str, list[dict[str, str]]],
                       encode: Callable[[list[str]], np.ndarray], fallback: PersonaSet) -> PersonaSet:
    """A :class:`PersonaSet` of LLM personas; items the file lacks keep their ``fallback`` personas."""
    texts = [persona_text(p) for i in item_ids for p in by_item.get(str(i), [])]
    vectors = _normalise(np.asarray(encode(texts), dtype=np.float32)) if texts else None
    rows: list[np.ndarray] = []
    names: list[str] = []
    descriptions: list[str] = []
    support: list[int] = []
    central: list[list[int]] = []
    rationales: list[str] = []
    offsets = np.zeros(len(item_ids) + 1, dtype=np.int64)
    used = 0
    missing = 0
    for pos, item in enumerate(item_ids):
        personas = by_item.get(str(item), [])
        if personas:
            rows.append(vectors[used:used + len(personas)])
            used += len(personas)
            names += [p["name"] for p in personas]
            descriptions += [p["description"] for p in personas]
            rationales += [str(p.get("rationale", "")) for p in personas]
            support += [0] * len(personas)
            central += [[] for _ in personas]
        else:
            missing += 1
            span = fallback.personas_of(pos)
            rows.append(fallback.vectors[span.start:span.stop])
            names += fallback.names[span.start:span.stop]
            descriptions += fallback.descriptions[span.start:span.stop]
            rationales += fallback.rationales[span.start:span.stop] if fallback.rationales else [""] * len(span)
            support += fallback.support[span.start:span.stop].tolist()
            central += fallback.central_reviews[span.start:span.stop]
        offsets[pos + 1] = offsets[pos] + len(rows[-1])
    return PersonaSet(item_ids=[str(i) for i in item_ids], vectors=np.ascontiguousarray(np.concatenate(rows)),
                      offsets=offsets, names=names, descriptions=descriptions,
                      support=np.asarray(support, dtype=np.int64), central_reviews=central, rationales=rationales,
                      params={"method": "llm-persona-file", "items_without_llm_personas": missing,
                              "fallback": fallback.params})
