"""Dedupe, k-core, the leave-one-out split by time (including its tie-break) and the temporal split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona4rec.data import ReviewTable, dedupe_keep_latest, k_core, leave_one_out_split, temporal_split


def table(rows: list[tuple[str, str, float]]) -> ReviewTable:
    users, items, times = zip(*rows) if rows else ((), (), ())
    n = len(rows)
    return ReviewTable.from_columns(list(users), list(items), [1.0] * n, list(times),
                                    [f"t{k}" for k in range(n)], [f"x{k}" for k in range(n)])


def test_dedupe_keeps_the_latest_review_and_the_later_line_on_ties() -> None:
    t = table([("u", "a", 5), ("u", "a", 9), ("u", "b", 1), ("v", "a", 3), ("v", "a", 3)])
    kept = dedupe_keep_latest(t)
    assert sorted(zip(kept.user, kept.item, kept.timestamp, kept.title)) == [
        ("u", "a", 9.0, "t1"), ("u", "b", 1.0, "t2"), ("v", "a", 3.0, "t4")]


def test_k_core_cascades_until_stable() -> None:
    # Dropping user w (one review) leaves item c with one review, which then drops too,
    # which leaves user v with one review.
    rows = [("u", "a", 1), ("u", "b", 2), ("v", "a", 3), ("v", "b", 4), ("v", "c", 5), ("w", "c", 6),
            ("x", "a", 1), ("x", "b", 1)]
    kept = k_core(table(rows), k=2)
    assert sorted(set(kept.user)) == ["u", "v", "x"]
    assert sorted(set(kept.item)) == ["a", "b"]
    counts = {u: int((kept.user == u).sum()) for u in set(kept.user)}
    assert min(counts.values()) >= 2


def test_split_holds_out_last_two_by_time_and_keeps_short_users_in_train() -> None:
    rows = [("u", "a", 3), ("u", "b", 1), ("u", "c", 2), ("u", "d", 4), ("s", "a", 1), ("s", "b", 2)]
    t = table(rows)
    split = leave_one_out_split(t, tie_break="file")
    assert list(t.item[split.test]) == ["d"] and list(t.item[split.valid]) == ["a"]
    assert sorted(t.item[split.train][t.user[split.train] == "u"]) == ["b", "c"]
    assert sorted(t.item[split.train][t.user[split.train] == "s"]) == ["a", "b"]


def test_tie_break_file_order_vs_seeded_random() -> None:
    # One user, five reviews on the same day: file order holds out the last two lines.
    rows = [("u", f"i{k}", 100) for k in range(5)] + [("u", "old", 1)]
    t = table(rows)
    file_split = leave_one_out_split(t, tie_break="file")
    assert t.item[file_split.test[0]] == "i4" and t.item[file_split.valid[0]] == "i3"
    picks = {(t.item[s.valid[0]], t.item[s.test[0]])
             for s in (leave_one_out_split(t, "random", seed) for seed in range(20))}
    assert len(picks) > 3  # the random tie-break really varies with the seed
    assert all("old" not in pick for pick in picks)  # ties are broken only within equal times
    again = leave_one_out_split(t, "random", 7)
    once = leave_one_out_split(t, "random", 7)
    assert np.array_equal(again.test, once.test) and np.array_equal(again.valid, once.valid)
    with pytest.raises(ValueError, match="tie_break"):
        leave_one_out_split(t, tie_break="latest")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("uvwx"), st.sampled_from("abcdefgh"), st.integers(0, 5)),
                min_size=1, max_size=40),
       st.sampled_from(["file", "random"]), st.integers(0, 3))
def test_split_is_a_partition_ordered_in_time(rows, tie_break, seed) -> None:
    t = dedupe_keep_latest(table(rows))
    split = leave_one_out_split(t, tie_break=tie_break, seed=seed)
    every = np.concatenate([split.train, split.valid, split.test])
    assert sorted(every.tolist()) == list(range(len(t)))
    assert np.array_equal(t.user[split.valid], t.user[split.test])
    for v, s in zip(split.valid, split.test):
        user = t.user[s]
        train_times = t.timestamp[split.train][t.user[split.train] == user]
        assert len(train_times) >= 1
        assert train_times.max() <= t.timestamp[v] <= t.timestamp[s]
    counts = {u: int((t.user == u).sum()) for u in set(t.user)}
    assert len(split.test) == sum(c >= 3 for c in counts.values())


def test_real_mi_5core_tie_statistics() -> None:
    shared = os.environ.get("PERSONA4REC_SHARED")
    if not shared or not (Path(shared) / "data" / "amazon-mi-5core").is_dir():
        pytest.skip("PERSONA4REC_SHARED is not set or has no data/amazon-mi-5core")
    from persona4rec.data import load_dataset

    reviews, _ = load_dataset("amazon-mi-5core", download=False)
    assert len(dedupe_keep_latest(reviews)) == len(reviews)  # the file has no duplicate pairs
    file_split = leave_one_out_split(reviews, tie_break="file")
    assert len(file_split.test) == 1_429 and len(file_split.train) == 10_261 - 2 * 1_429
    same_day = reviews.timestamp[file_split.valid] == reviews.timestamp[file_split.test]
    assert int(same_day.sum()) == 631
    random_split = leave_one_out_split(reviews, tie_break="random", seed=0)
    # Only users with a same-day tie can change their held-out pair.
    changed = reviews.item[random_split.test] != reviews.item[file_split.test]
    assert changed.any() and not (changed & ~same_day).any()


def test_temporal_split_cuts_globally_and_targets_each_users_first_review_of_a_period() -> None:
    rows = [("u", "a", 1), ("u", "b", 2), ("u", "c", 8), ("u", "d", 9), ("u", "e", 10),
            ("v", "a", 3), ("v", "b", 3.5), ("v", "f", 9.5),
            ("w", "b", 7), ("w", "c", 7.5), ("w", "g", 11),   # nothing in the validation period
            ("x", "g", 10.5), ("x", "h", 11.5),              # no train review: never evaluated
            ("y", "a", 4), ("y", "b", 5), ("y", "c", 6)]     # train only
    t = table(rows)
    split = temporal_split(t, valid_share=0.2, test_share=0.2, tie_break="file")
    assert split.valid_start == 8 and split.test_start == 10  # times at the 60% and 80% positions
    ts = t.timestamp
    assert (ts[split.train] < split.valid_start).all()
    assert ((ts[split.valid_period] >= split.valid_start) & (ts[split.valid_period] < split.test_start)).all()
    assert sorted(np.concatenate([split.train, split.valid_period]).tolist()) == \
        np.flatnonzero(ts < split.test_start).tolist()
    # validation: each user's first validation-period review (u: c, not d)
    assert sorted(zip(t.user[split.valid], t.item[split.valid])) == [("u", "c"), ("v", "f")]
    # test: first test-period review of each user with a train review; x has none, y no test review
    assert sorted(zip(t.user[split.test], t.item[split.test])) == [("u", "e"), ("w", "g")]
    assert "temporal" in split.describe() and split.protocol == "temporal"
    with pytest.raises(ValueError, match="sum below 1"):
        temporal_split(t, valid_share=0.6, test_share=0.5)
    with pytest.raises(ValueError, match="distinct times"):
        temporal_split(table([("u", "a", 1), ("v", "b", 1), ("w", "c", 1)]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("uvwx"), st.sampled_from("abcdefgh"), st.integers(0, 9)),
                min_size=3, max_size=40), st.integers(0, 3))
def test_temporal_split_never_lets_a_target_precede_any_train_review(rows, seed) -> None:
    t = dedupe_keep_latest(table(rows))
    try:
        split = temporal_split(t, 0.2, 0.2, seed=seed)
    except ValueError as exc:
        assert "distinct times" in str(exc)
        return
    latest_train = t.timestamp[split.train].max()
    for targets, start in ((split.valid, split.valid_start), (split.test, split.test_start)):
        assert len(set(t.user[targets].tolist())) == len(targets)  # one target per user
        assert (t.timestamp[targets] >= start).all() and (t.timestamp[targets] > latest_train).all()
        assert set(t.user[targets].tolist()) <= set(t.user[split.train].tolist())
    assert set(split.valid.tolist()) <= set(split.valid_period.tolist())


def test_real_mi_5core_temporal_split() -> None:
    shared = os.environ.get("PERSONA4REC_SHARED")
    if not shared or not (Path(shared) / "data" / "amazon-mi-5core").is_dir():
        pytest.skip("PERSONA4REC_SHARED is not set or has no data/amazon-mi-5core")
    from persona4rec.data import load_dataset

    reviews, _ = load_dataset("amazon-mi-5core", download=False)
    split = temporal_split(reviews)
    assert len(split.train) == 8208 and len(split.valid_period) == 1021
    assert len(split.valid) == 274 and len(split.test) == 294
