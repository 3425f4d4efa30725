"""Extractive personas: spherical k-means, persona counts, names from real review words."""

from __future__ import annotations

import numpy as np
import pytest

from persona4rec.personas import extract_personas, mean_item_vectors, personas_for, spherical_kmeans


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(n_per: int = 6, k: int = 3, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, dim)))
    labels = np.repeat(np.arange(k), n_per)
    points = unit(centres[labels] + 0.15 * rng.standard_normal((len(labels), dim)))
    return points, labels, centres


def test_spherical_kmeans_recovers_planted_clusters() -> None:
    points, truth, centres = planted()
    centroids, labels = spherical_kmeans(points, 3, seed=4)
    # Same partition up to renaming, and each centroid lies next to one true centre.
    pairs = {(int(a), int(b)) for a, b in zip(truth, labels)}
    assert len(pairs) == 3
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0)
    assert (centroids @ centres.T).max(axis=1).min() > 0.95
    again, _ = spherical_kmeans(points, 3, seed=4)
    assert np.array_equal(again, centroids)
    with pytest.raises(ValueError, match="k must be"):
        spherical_kmeans(points, 0)


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 1), (3, 1), (4, 2), (9, 4), (10, 5), (40, 5)])
def test_personas_for_scales_with_reviews(n: int, expected: int) -> None:
    assert personas_for(n, max_personas=5, reviews_per_persona=2) == expected


def test_extract_personas_layout_names_and_fallback() -> None:
    points, truth, _ = planted(n_per=4, k=2)
    review_item = np.zeros(len(points), dtype=np.int64)
    titles = [f"title {k} of cluster {t}" for k, t in enumerate(truth)]
    texts = [f"Opening sentence {k}. More words." for k in range(len(points))]
    fallback = unit(np.ones((2, points.shape[1])))
    ps = extract_personas(["A", "B"], review_item, points, titles, texts, max_personas=2, reviews_per_persona=2,
                          fallback_vectors=fallback, fallback_names=["Item A", "Item B"], label_style="titles")
    assert ps.offsets.tolist() == [0, 2, 3]
    assert ps.vectors.dtype == np.float32 and ps.vectors.flags.c_contiguous
    assert np.allclose(np.linalg.norm(ps.vectors, axis=1), 1.0)
    # Each persona is named by a central review's title from its own cluster.
    for p in range(2):
        members = [int(r) for r in ps.central_reviews[p]]
        assert len({int(truth[r]) for r in members}) == 1
        assert ps.names[p] == titles[members[0]]
        assert "Opening sentence" in ps.descriptions[p]
    assert ps.support[:2].sum() == len(points)
    # Item B has no review: one persona from the fallback vector, named by the item.
    assert ps.names[2] == "Item B" and np.allclose(ps.vectors[2], fallback[1], atol=1e-6)
    assert ps.item_of_persona().tolist() == [0, 0, 1]
    assert [r["persona_id"] for r in ps.to_records()] == ["A_E1", "A_E2", "B_E1"]
    with pytest.raises(ValueError, match="no reviews"):
        extract_personas(["A", "B"], review_item, points, titles, texts)


def test_mean_item_vectors() -> None:
    vectors = unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    out = mean_item_vectors(3, np.array([0, 0, 1]), vectors, fallback_vectors=np.array([[0, 0], [0, 0], [-1.0, 0]]))
    assert np.allclose(out[0], unit(np.array([1.0, 1.0])))
    assert np.allclose(out[1], vectors[2]) and np.allclose(out[2], [-1.0, 0.0])


def test_llm_persona_file_with_fallback_and_errors(tmp_path) -> None:
    import gzip
    import json

    from persona4rec.data import DataFormatError
    from persona4rec.personas import load_persona_file, personas_from_file

    rows = [{"item_id": "A", "personas": [{"ID": "P1", "Name": "Gig Player", "Description": "Plays live.",
                                           "Preference_Rationale": "Needs it sturdy."},
                                          {"ID": "P2", "Name": "Home Tinkerer", "Description": "Tweaks gear."}]}]
    path = tmp_path / "3_personas.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    by_item = load_persona_file(str(path))
    points, truth, _ = planted(n_per=2, k=2)
    fallback = extract_personas(["A", "B"], np.array([0, 0, 1, 1]), points, ["t"] * 4, ["x"] * 4)
    seen: list[str] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.extend(texts)
        return unit(np.random.default_rng(0).standard_normal((len(texts), points.shape[1])))

    ps = personas_from_file(["A", "B"], by_item, encode, fallback)
    assert seen == ["Gig Player. Plays live. Needs it sturdy.", "Home Tinkerer. Tweaks gear."]
    assert ps.names[:2] == ["Gig Player", "Home Tinkerer"]
    # LLM rationales travel with the personas (into the index and the Recommender's results).
    assert ps.rationales[:2] == ["Needs it sturdy.", ""] and len(ps.rationales) == ps.n_personas
    assert ps.offsets.tolist() == [0, 2, 2 + fallback.offsets[2] - fallback.offsets[1]]
    assert np.array_equal(ps.vectors[2:], fallback.vectors[fallback.offsets[1]:])
    assert ps.params["items_without_llm_personas"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"item_id": "A", "personas": [{"ID": "P1"}]}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl: line 1: field 'personas\[0\].Name'"):
        load_persona_file(str(bad))


@pytest.mark.parametrize("noise", [0.0, 1e-7, 1e-3])
def test_duplicate_and_near_duplicate_reviews_never_crash_or_make_empty_personas(noise: float) -> None:
    # Six identical "Five Stars" reviews with an empty body (a real Amazon pattern), and the
    # same with tiny perturbations: k-means used to leave a cluster empty and IndexError.
    rng = np.random.default_rng(3)
    base = unit(rng.standard_normal(32))
    points = unit(base[None, :] + noise * rng.standard_normal((6, 32))).astype(np.float32)
    other = unit(rng.standard_normal((4, 32))).astype(np.float32)
    review_item = np.array([0] * 6 + [1] * 4)
    ps = extract_personas(["dup", "ok"], review_item, np.vstack([points, other]),
                          ["Five Stars"] * 6 + ["a", "b", "c", "d"], [""] * 10,
                          max_personas=5, reviews_per_persona=1)
    counts = np.diff(ps.offsets)
    assert counts[1] == 4  # distinct reviews still make one persona each
    if noise == 0.0:
        assert counts[0] == 1  # identical reviews make one persona, not copies of it
    assert 1 <= counts[0] <= 5
    assert ps.support[: counts[0]].sum() == 6 and (ps.support > 0).all()
    assert all(name == "Five Stars" for name in ps.names[: counts[0]])
    assert np.isfinite(ps.vectors).all() and np.allclose(np.linalg.norm(ps.vectors, axis=1), 1.0, atol=1e-5)


def test_kmeans_with_more_clusters_than_distinct_points_leaves_no_cluster_empty_when_it_can() -> None:
    points = unit(np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2))
    _, labels = spherical_kmeans(points, 3, seed=0)
    assert sorted(np.bincount(labels, minlength=3).tolist())[0] >= 1


def test_term_labels_read_as_a_kind_of_reviewer_with_a_representative_sentence() -> None:
    # Two planted groups of one item: gigging players who talk about the stage and the strap,
    # and beginners who talk about tuning and price; titles are the unhelpful "Five Stars".
    points, truth, _ = planted(n_per=4, k=2)
    texts = []
    for k, t in enumerate(truth):
        if t == 0:
            texts.append(f"I play gigs every weekend and the strap holds my heavy bass on stage. Review {k}.")
        else:
            texts.append(f"As a beginner the tuning stays stable and the price was right for me. Review {k}.")
    ps = extract_personas(["A"], np.zeros(len(points), dtype=np.int64), points, ["Five Stars"] * len(points), texts,
                          max_personas=2, reviews_per_persona=2)
    assert ps.params["labels"] == "terms"
    for p in range(2):
        group = int(truth[ps.central_reviews[p][0]])
        name, description = ps.names[p], ps.descriptions[p]
        assert name.startswith("Reviewers who mention ")
        expected = {"gigs", "strap", "stage", "bass", "weekend", "heavy", "play"} if group == 0 else \
            {"beginner", "tuning", "price", "stable", "stays", "right"}
        assert set(name.removeprefix("Reviewers who mention ").replace(" and ", ", ").split(", ")) <= expected
        assert ("strap holds my heavy bass" in description) == (group == 0)  # its own sentence, quoted
        assert "Five Stars" in description and "Distinctive words:" in description
    assert ps.names[0] != ps.names[1]
    with pytest.raises(ValueError, match="label_style"):
        extract_personas(["A"], np.zeros(1, dtype=np.int64), points[:1], ["t"], ["x"], label_style="llm")
