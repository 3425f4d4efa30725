"""User profiles: selection, weights, transform, the interaction-embedding cache, templates."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from persona4rec.encoder import EncoderMismatchError
from persona4rec.profile import (
    TEMPLATES,
    AspectSummaryTemplate,
    CacheCorruptError,
    EmptyHistoryError,
    Interaction,
    InteractionEmbeddingCache,
    ReviewTextTemplate,
    UserProfiler,
    get_template,
    recency_weights,
)

DIM = 16


class CountingEncoder:
    """Deterministic unit vectors from a text hash; records every text it is asked to encode."""

    def __init__(self, fingerprint: str = "fp-a", dim: int = DIM) -> None:
        self.fingerprint = fingerprint
        self.dim = dim
        self.calls: list[list[str]] = []

    def vector(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def encode(self, texts, batch_size: int = 32) -> np.ndarray:
        self.calls.append(list(texts))
        return np.vstack([self.vector(t) for t in texts]) if texts else np.empty((0, self.dim), np.float32)

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


def reference_profile(enc: CountingEncoder, texts_oldest_first: list[str], gamma: float) -> np.ndarray:
    n = len(texts_oldest_first)
    weights = np.array([gamma ** (n - 1 - i) for i in range(n)])
    mean = sum(w * enc.vector(t) for w, t in zip(weights / weights.sum(), texts_oldest_first))
    return mean / np.linalg.norm(mean)


def history(n: int, start: int = 0) -> list[Interaction]:
    return [Interaction(f"interaction {i}", rating=5.0, timestamp=float(i)) for i in range(start, start + n)]


@pytest.fixture
def enc() -> CountingEncoder:
    return CountingEncoder()


@pytest.fixture
def profiler(enc: CountingEncoder) -> UserProfiler:
    return UserProfiler(enc, cache=False)


# ---------------------------------------------------------------- weights and selection


def test_recency_weights_favour_the_newest() -> None:
    np.testing.assert_allclose(recency_weights(3, 0.5), np.array([1, 2, 4]) / 7, rtol=1e-6)
    w = recency_weights(10, 0.65)
    assert w.dtype == np.float32 and abs(w.sum() - 1) < 1e-6 and np.all(np.diff(w) > 0)
    np.testing.assert_allclose(recency_weights(4, 1.0), 0.25)
    with pytest.raises(ValueError):
        recency_weights(0)


def test_profile_is_the_normalised_weighted_mean(profiler: UserProfiler, enc: CountingEncoder) -> None:
    h = history(4)
    got = profiler.profile(h)
    want = reference_profile(enc, [x.text for x in h], 0.65)
    assert got.shape == (DIM,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_only_the_k_newest_count_and_order_follows_timestamps(enc: CountingEncoder) -> None:
    profiler = UserProfiler(enc, cache=False, k=3, gamma=0.5)
    h = history(8)
    shuffled = [h[i] for i in (5, 0, 7, 2, 6, 1, 4, 3)]
    selected = profiler.select(shuffled)
    assert [x.text for x in selected] == ["interaction 5", "interaction 6", "interaction 7"]
    np.testing.assert_allclose(
        profiler.profile(shuffled),
        reference_profile(enc, ["interaction 5", "interaction 6", "interaction 7"], 0.5),
        rtol=1e-5,
        atol=1e-6,
    )
    assert sorted(enc.encoded) == ["interaction 5", "interaction 6", "interaction 7"]


def test_list_order_is_used_without_timestamps(profiler: UserProfiler, enc: CountingEncoder) -> None:
    texts = ["first", "second", "third"]
    np.testing.assert_allclose(profiler.profile(texts), reference_profile(enc, texts, 0.65), rtol=1e-5, atol=1e-6)
    assert profiler.profile(texts) @ profiler.profile(texts[::-1]) < 0.9999


def test_mixed_timestamps_are_rejected(profiler: UserProfiler) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        profiler.profile([Interaction("a", timestamp=1.0), Interaction("b")])


def test_rating_filter(enc: CountingEncoder) -> None:
    h = [
        Interaction("loved", rating=5, timestamp=1),
        Interaction("hated", rating=1, timestamp=2),
        Interaction("meh", rating=3, timestamp=3),
        Interaction("unrated", rating=None, timestamp=4),
    ]
    kept = [x.text for x in UserProfiler(enc, cache=False).select(h)]
    assert kept == ["loved", "meh", "unrated"]
    assert [x.text for x in UserProfiler(enc, cache=False, min_rating=4).select(h)] == ["loved", "unrated"]
    assert len(UserProfiler(enc, cache=False, min_rating=None).select(h)) == 4


def test_empty_history_is_a_typed_error(profiler: UserProfiler) -> None:
    with pytest.raises(EmptyHistoryError) as info:
        profiler.profile([], user_id="u1")
    assert info.value.user_id == "u1" and info.value.given == 0
    with pytest.raises(EmptyHistoryError) as info:
        profiler.profile([Interaction("bad", rating=1), Interaction("   ", rating=5)])
    assert (info.value.given, info.value.below_min_rating, info.value.empty_text) == (2, 1, 1)
    assert "fall back" in str(info.value)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ("just text", TypeError, "sequence of interactions"),
        ([Interaction("a"), 42], TypeError, r"history\[1\] is int"),
        ([{"summary": "x", "rating": float("nan")}], ValueError, r"history\[0\].*NaN"),
        ([{"summary": "x", "rating": "five"}], ValueError, r"rating"),
    ],
)
def test_bad_history_entries(profiler: UserProfiler, bad, error, match) -> None:
    with pytest.raises(error, match=match):
        profiler.profile(bad)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"text": b"bytes"}, TypeError),
        ({"text": "x", "rating": float("nan")}, ValueError),
        ({"text": "x", "timestamp": float("inf")}, ValueError),
        ({"text": "x", "rating": "5"}, ValueError),
    ],
)
def test_interaction_validates_its_fields(kwargs, error) -> None:
    with pytest.raises(error):
        Interaction(**kwargs)


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"gamma": 0.0}, {"gamma": 1.5}, {"min_rating": float("nan")}])
def test_bad_parameters(enc: CountingEncoder, kwargs) -> None:
    with pytest.raises(ValueError):
        UserProfiler(enc, cache=False, **kwargs)


# ---------------------------------------------------------------- transform


def test_transform_applies_before_normalisation(enc: CountingEncoder) -> None:
    mask = np.zeros(DIM, np.float32)
    mask[:4] = 1.0
    seen_shapes = []

    def keep_first_four(v: np.ndarray) -> np.ndarray:
        seen_shapes.append(v.shape)
        return v * mask

    profiler = UserProfiler(enc, cache=False, transform=keep_first_four)
    h = history(3)
    got = profiler.profile(h)
    mean = sum(w * enc.vector(x.text) for w, x in zip(recency_weights(3), h))
    want = mean * mask / np.linalg.norm(mean * mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[4:] == 0)

    batch = profiler.profile_many([h, history(2, 10)])
    np.testing.assert_allclose(batch.vectors[0], got, rtol=1e-5, atol=1e-6)
    assert seen_shapes == [(DIM,), (2, DIM)]


def test_transform_with_wrong_shape(enc: CountingEncoder) -> None:
    profiler = UserProfiler(enc, cache=False, transform=lambda v: v[:3])
    with pytest.raises(ValueError, match="transform returned shape"):
        profiler.profile(history(2))


# ---------------------------------------------------------------- cache


def test_returning_user_costs_no_model_call(tmp_path: Path, enc: CountingEncoder) -> None:
    profiler = UserProfiler(enc, cache=tmp_path / "cache")
    first = profiler.profile(history(5))
    assert len(enc.calls) == 1
    again = profiler.profile(history(5))
    assert len(enc.calls) == 1, "a cached user must not reach the encoder"
    np.testing.assert_array_equal(first, again)
    profiler.profile(history(6))  # one new interaction
    assert enc.calls[-1] == ["interaction 5"]


def test_cache_persists_across_processes(tmp_path: Path, enc: CountingEncoder) -> None:
    first = UserProfiler(enc, cache=tmp_path / "cache").profile(history(4))
    fresh_encoder = CountingEncoder()
    reopened = UserProfiler(fresh_encoder, cache=InteractionEmbeddingCache(tmp_path / "cache", fingerprint="fp-a", dim=DIM, read_only=True))
    np.testing.assert_array_equal(reopened.profile(history(4)), first)
    assert fresh_encoder.calls == []


def test_duplicate_texts_are_encoded_once(profiler: UserProfiler, enc: CountingEncoder) -> None:
    profiler.profile(["same", "same", "other", "same"])
    assert sorted(enc.encoded) == ["other", "same"]


def test_cache_of_another_encoder_is_refused(tmp_path: Path, enc: CountingEncoder) -> None:
    UserProfiler(enc, cache=tmp_path / "cache").profile(history(2))
    other = CountingEncoder(fingerprint="fp-b")
    with pytest.raises(EncoderMismatchError, match="fp-a"):
        UserProfiler(other, cache=tmp_path / "cache")
    cache_a = InteractionEmbeddingCache(None, fingerprint="fp-a", dim=DIM)
    with pytest.raises(EncoderMismatchError):
        UserProfiler(other, cache=cache_a)


def test_default_cache_dir_is_keyed_by_fingerprint(monkeypatch, tmp_path: Path, enc: CountingEncoder) -> None:
    monkeypatch.setenv("PERSONA4REC_CACHE_DIR", str(tmp_path / "root"))
    profiler = UserProfiler(enc)
    assert profiler.cache.directory == tmp_path / "root" / "interactions" / "fp-a"


def test_a_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    first = InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)
    code = ("from persona4rec.profile import InteractionEmbeddingCache as C\n"
            f"C({str(tmp_path / 'c')!r}, fingerprint='f', dim=4)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "read_only=True" in out.stderr
    first.close()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_writers_in_one_process_share_the_directory(tmp_path: Path) -> None:
    import threading

    caches = [InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4) for _ in range(4)]
    errors: list[str] = []

    def fill(t: int) -> None:
        try:
            for i in range(50):
                key = bytes([t, i]) * 8
                caches[t].put([key], np.full((1, 4), t * 100 + i, np.float32))
        except Exception as e:  # noqa: BLE001 - any failure counts
            errors.append(repr(e))

    threads = [threading.Thread(target=fill, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for c in caches:
        c.close()
    reopened = InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4, read_only=True)
    assert len(reopened) == 200
    for t in range(4):
        for i in (0, 49):
            row = reopened.rows_of([bytes([t, i]) * 8])
            np.testing.assert_array_equal(reopened.gather(row), np.full((1, 4), t * 100 + i, np.float32))


def test_a_closed_cache_refuses_writes(tmp_path: Path) -> None:
    cache = InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)
    cache.put([b"a" * 16], np.ones((1, 4), np.float32))
    cache.close()
    assert len(cache) == 1  # still readable
    with pytest.raises(RuntimeError, match="closed"):
        cache.put([b"b" * 16], np.ones((1, 4), np.float32))
    assert os.path.getsize(tmp_path / "c" / "keys.bin") == 16


def test_corrupted_rows_are_left_out_and_encoded_again(tmp_path: Path, enc: CountingEncoder) -> None:
    texts = [f"interaction number {i}" for i in range(6)]
    profiler = UserProfiler(enc, cache=tmp_path / "c", min_rating=None)
    expected = profiler.profile(texts)
    profiler.cache.close()
    vectors = tmp_path / "c" / "vectors.f32"
    raw = bytearray(vectors.read_bytes())
    raw[4 * DIM * 2 + 3] ^= 0x10  # one bit of row 2
    row = 4 * DIM
    raw[0:row], raw[row:2 * row] = raw[row:2 * row], raw[0:row]  # rows 0 and 1 swapped
    vectors.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="3 rows fail their checksum"):
        reopened = UserProfiler(enc, cache=tmp_path / "c", min_rating=None)
    n_calls = len(enc.calls)
    np.testing.assert_array_equal(reopened.profile(texts), expected)
    assert enc.calls[n_calls:] == [texts[:3]]  # exactly the three bad rows were encoded again


def test_a_version_1_cache_gains_row_checksums(tmp_path: Path) -> None:
    import json

    vectors = _filled_cache(tmp_path / "c")
    (tmp_path / "c" / "sums.u64").unlink()
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps(dict(meta, version=1)))
    cache = InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)
    assert len(cache) == 3 and json.loads((tmp_path / "c" / "meta.json").read_text())["version"] == 2
    assert os.path.getsize(tmp_path / "c" / "sums.u64") == 3 * 8
    cache.close()
    again = InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4, read_only=True)
    np.testing.assert_array_equal(again.gather(again.rows_of([bytes([1]) * 16])), vectors[1:2])


def _filled_cache(directory: Path, n: int = 3, dim: int = 4) -> np.ndarray:
    cache = InteractionEmbeddingCache(directory, fingerprint="f", dim=dim)
    vectors = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    cache.put([bytes([i]) * 16 for i in range(n)], vectors)
    cache.close()
    return vectors


def test_interrupted_append_is_trimmed(tmp_path: Path) -> None:
    vectors = _filled_cache(tmp_path / "c")
    with open(tmp_path / "c" / "vectors.f32", "ab") as fh:  # crash after the vector, before the key
        fh.write(np.ones(4, np.float32).tobytes()[:10])
    with pytest.warns(RuntimeWarning, match="incomplete tail"):
        cache = InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)
    assert len(cache) == 3
    np.testing.assert_array_equal(cache.gather(cache.rows_of([bytes([2]) * 16])), vectors[2:3])
    assert os.path.getsize(tmp_path / "c" / "vectors.f32") == 3 * 4 * 4


def test_more_keys_than_vectors_is_corruption(tmp_path: Path) -> None:
    _filled_cache(tmp_path / "c")
    with open(tmp_path / "c" / "keys.bin", "ab") as fh:
        fh.write(b"k" * 16)
    with pytest.raises(CacheCorruptError, match="delete the directory"):
        InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)


def test_damaged_metadata(tmp_path: Path) -> None:
    _filled_cache(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text("{trunc")
    with pytest.raises(CacheCorruptError, match="damaged"):
        InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(CacheCorruptError, match="no meta.json"):
        InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)


def test_cache_refuses_bad_vectors(tmp_path: Path) -> None:
    cache = InteractionEmbeddingCache(None, fingerprint="f", dim=4)
    with pytest.raises(ValueError, match="non-finite"):
        cache.put([b"a" * 16], np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        cache.put([b"a" * 16], np.zeros((1, 5), np.float32))
    assert len(cache) == 0


def test_rows_added_after_open_and_reopened(tmp_path: Path) -> None:
    vectors = _filled_cache(tmp_path / "c", n=2)
    cache = InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4)
    extra = np.full((70, 4), 7.0, np.float32)  # more than the initial in-memory capacity
    cache.put([bytes([100 + i]) * 16 for i in range(70)], extra)
    mixed_rows = cache.rows_of([bytes([1]) * 16, bytes([169]) * 16])
    np.testing.assert_array_equal(cache.gather(mixed_rows), np.vstack([vectors[1], extra[-1]]))
    np.testing.assert_array_equal(cache.gather(np.array(mixed_rows)), np.vstack([vectors[1], extra[-1]]))
    assert cache.gather([]).shape == (0, 4)
    cache.close()
    assert len(InteractionEmbeddingCache(tmp_path / "c", fingerprint="f", dim=4, read_only=True)) == 72


# ---------------------------------------------------------------- many users


def test_profile_many_matches_single_profiles_in_one_model_call(enc: CountingEncoder) -> None:
    profiler = UserProfiler(enc, cache=False)
    histories = [history(3), [], history(12, 100), [Interaction("low", rating=1)]]
    batch = profiler.profile_many(histories, user_ids=["a", "b", "c", "d"])
    assert len(enc.calls) == 1
    assert batch.positions.tolist() == [0, 2] and batch.empty_positions.tolist() == [1, 3]
    assert batch.vectors.shape == (2, DIM)
    single = UserProfiler(CountingEncoder(), cache=False)
    np.testing.assert_allclose(batch.vectors[0], single.profile(histories[0]), rtol=1e-6)
    np.testing.assert_allclose(batch.vectors[1], single.profile(histories[2]), rtol=1e-6)


# ---------------------------------------------------------------- templates

AMAZON_RECORD = {
    "item_id": "B1",
    "review_title": "Thought provoking",
    "summary": "A post-war novel about friendship across class lines.",
    "extracted": {
        "category_preference": "Historical Fiction",
        "category_preference_reason": "mentions history",
        "purchase_purpose": None,
        "quality_criteria": "Engagement, Emotional Impact.",
        "usage_context": "None",
    },
    "timestamp": 1606780947726,
    "rating": 4.0,
}


def test_amazon_template() -> None:
    x = get_template("amazon")(AMAZON_RECORD)
    assert x.text == (
        "Category preference: Historical Fiction. Quality criteria: Engagement, Emotional Impact.\n"
        "A post-war novel about friendship across class lines."
    )
    assert (x.rating, x.timestamp, x.item_id) == (4.0, 1606780947726.0, "B1")


def test_timestamps_as_iso_dates() -> None:
    template = get_template("yelp")
    older = template({"summary": "a", "timestamp": "2017-10-09 04:08:23"})
    newer = template({"summary": "b", "timestamp": "2018-01-01"})
    assert older.timestamp < newer.timestamp
    with pytest.raises(ValueError, match="ISO 8601"):
        template({"summary": "c", "timestamp": "last tuesday"})


def test_aspect_template_falls_back_to_review_text() -> None:
    record = {"review_title": "Great", "review_text": "Loved every page", "extracted": {"usage_context": None}}
    assert AspectSummaryTemplate()(record).text == "Great. Loved every page"
    with pytest.raises(ValueError, match="mapping of aspects"):
        AspectSummaryTemplate()({"extracted": "oops"})


def test_review_text_template_for_5core_rows() -> None:
    row = {"asin": "X1", "summary": "good", "reviewText": "Filters pops.", "overall": 5.0, "unixReviewTime": 1393545600}
    x = ReviewTextTemplate()(dict(row, item_title="Pop Filter."))
    assert x.text == "Pop Filter. good. Filters pops."
    assert (x.rating, x.timestamp, x.item_id) == (5.0, 1393545600.0, "X1")
    assert ReviewTextTemplate()(row).text == "good. Filters pops."


def test_unknown_domain() -> None:
    with pytest.raises(ValueError, match="known: amazon, yelp"):
        get_template("netflix")


def _shared() -> Path:
    root = os.environ.get("PERSONA4REC_SHARED")
    if not root or not Path(root).is_dir():
        pytest.skip("PERSONA4REC_SHARED is not set or missing")
    return Path(root)


@pytest.mark.parametrize("domain", ["amazon", "yelp"])
def test_templates_on_real_sample_histories(domain: str, enc: CountingEncoder) -> None:
    path = _shared() / "data" / "persona4rec-sample" / domain / "3.5_history_loo.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        users = [json.loads(line) for line in fh]
    template = TEMPLATES[domain]
    texts = [template(r).text for u in users for r in u["reviews"]]
    assert all(texts) and not any("_reason" in t for t in texts)
    batch = UserProfiler(enc, cache=False, template=domain).profile_many([u["reviews"] for u in users])
    assert batch.vectors.shape[0] + batch.empty_positions.size == len(users)
    np.testing.assert_allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, rtol=1e-5)
