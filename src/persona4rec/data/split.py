"""Cleaning (duplicates, k-core) and the two evaluation splits: leave-one-out and temporal.

Duplicates: when a user reviewed the same item more than once, only the latest review
is kept (ties in time: the later line in the file), because the latest opinion is the
one a recommender should learn from and keeping both would let one item appear in a
user's history and as their held-out target at once.

Split: per user, reviews are ordered by time; the last is the test review, the second
to last the validation review, the rest are train. Users with fewer than three
reviews keep everything in train (they cannot be evaluated without leaking).

Ties in time decide which item is held out. Amazon 2014 stamps reviews per day and
its files are sorted by item id, so a file-order tie-break systematically holds out
the newest, least-reviewed product of that day. The default tie-break is therefore a
seeded random one (``tie_break="random"``, ``seed``); ``"file"`` reproduces file order.

Leave-one-out lets the training period of one user overlap the test day of another: the
item side then learns from reviews written after some users' test day. The temporal
split (:func:`temporal_split`) cuts the whole table at two global times instead: train
before the first cut, validation between the cuts, test after the second; each user's
first review of a period is their target there, and only users with a training review
are evaluated. Nothing fitted on train can have seen the future of any target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persona4rec.data.tables import ReviewTable

TIE_BREAKS = ("random", "file")


def dedupe_keep_latest(table: ReviewTable) -> ReviewTable:
    """Keep one review per (user, item): the latest (later file line on equal time)."""
    n = len(table)
    if n == 0:
        return table
    # Sort by (user, item, time, file position); the last row of each pair wins.
    order = np.lexsort((np.arange(n), table.timestamp, table.item.astype(str), table.user.astype(str)))
    users = table.user[order]
    items = table.item[order]
    last_of_pair = np.ones(n, dtype=bool)
    last_of_pair[:-1] = (users[:-1] != users[1:]) | (items[:-1] != items[1:])
    keep = np.sort(order[last_of_pair])
    return table.take(keep) if len(keep) < n else table


def k_core(table: ReviewTable, k: int = 5) -> ReviewTable:
    """Repeatedly drop users and items with fewer than ``k`` reviews until none remain."""
    if k <= 1:
        return table
    keep = np.ones(len(table), dtype=bool)
    while True:
        _, user_codes, user_counts = np.unique(table.user[keep].astype(str), return_inverse=True,
                                               return_counts=True)
        _, item_codes, item_counts = np.unique(table.item[keep].astype(str), return_inverse=True,
                                               return_counts=True)
        ok = (user_counts[user_codes] >= k) & (item_counts[item_codes] >= k)
        if ok.all():
            break
        rows = np.flatnonzero(keep)
        keep[rows[~ok]] = False
    return table.take(np.flatnonzero(keep))


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Row indices into the split table.

    ``valid[i]`` and ``test[i]`` belong to the same user (users in sorted id order);
    ``train`` holds every other row, in table order. ``chronological`` lists every row
    grouped by user and ordered in time with the split's tie-break, the order in which
    user histories should be read.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    tie_break: str
    seed: int
    chronological: np.ndarray

    protocol = "loo"

    @property
    def valid_period(self) -> np.ndarray:
        """Rows known at test time beyond train: the validation reviews themselves."""
        return self.valid

    def describe(self) -> str:
        return f"leave-one-out by time, tie-break={self.tie_break}" + (
            f" (seed {self.seed})" if self.tie_break == "random" else "")


def _chronological(table: ReviewTable, tie_break: str, seed: int) -> np.ndarray:
    """Every row grouped by user (sorted ids) and ordered in time, ties by ``tie_break``."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    n = len(table)
    secondary = np.random.default_rng(seed).permutation(n) if tie_break == "random" else np.arange(n)
    return np.lexsort((secondary, table.timestamp, table.user.astype(str)))


def leave_one_out_split(table: ReviewTable, tie_break: str = "random", seed: int = 0) -> LeaveOneOutSplit:
    """Split each user's reviews by time: last = test, second to last = validation, rest = train.

    ``tie_break`` orders reviews with the same timestamp: ``"random"`` (seeded by
    ``seed``, the default) or ``"file"`` (the order of the rows in the table).
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")
    n = len(table)
    if tie_break == "random":
        secondary = np.random.default_rng(seed).permutation(n)
    else:
        secondary = np.arange(n)
    user_keys = table.user.astype(str)
    order = np.lexsort((secondary, table.timestamp, user_keys))
    sorted_users = user_keys[order]
    is_last = np.ones(n, dtype=bool)
    is_last[:-1] = sorted_users[:-1] != sorted_users[1:]
    last_pos = np.flatnonzero(is_last)
    first_pos = np.concatenate([[0], last_pos[:-1] + 1])
    counts = last_pos - first_pos + 1
    evaluable = counts >= 3
    test = order[last_pos[evaluable]]
    valid = order[last_pos[evaluable] - 1]
    held_out = np.zeros(n, dtype=bool)
    held_out[test] = True
    held_out[valid] = True
    train = np.flatnonzero(~held_out)
    return LeaveOneOutSplit(train=train, valid=valid, test=test,
                            tie_break=tie_break, seed=seed, chronological=order)


@dataclass(frozen=True)
class TemporalSplit:
    """Row indices of a split by two global time cuts.

    ``train``: every row before ``valid_start``. ``valid_period``: every row in
    [``valid_start``, ``test_start``), known history at test time. ``valid``: one row per
    validation user (users with a train row and a validation-period row, sorted ids), their
    first validation-period review; ``test``: the same for the test period (from
    ``test_start`` on). Test-period rows after a user's target are never used.
    ``chronological`` orders every row by user and time with the tie-break.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    valid_period: np.ndarray
    valid_start: float
    test_start: float
    tie_break: str
    seed: int
    chronological: np.ndarray

    protocol = "temporal"

    def describe(self) -> str:
        return (f"temporal: global cuts at t={self.valid_start:.0f} (validation) and t={self.test_start:.0f} (test), "
                f"first review of each period per user is the target, tie-break={self.tie_break}" +
                (f" (seed {self.seed})" if self.tie_break == "random" else ""))


def temporal_split(table: ReviewTable, valid_share: float = 0.1, test_share: float = 0.1,
                   tie_break: str = "random", seed: int = 0) -> TemporalSplit:
    """Cut the table at two global times so that about ``test_share`` of the reviews are in
    the test period and ``valid_share`` in the validation period before it.

    The cuts are timestamps of the table (a whole day stays on one side when reviews are
    stamped per day), so the shares are approximate. Users without a train review are not
    evaluated in either period (nothing about them is known at the cut).
    """
    if not (0 < valid_share < 1 and 0 < test_share < 1 and valid_share + test_share < 1):
        raise ValueError(f"valid_share and test_share must be in (0, 1) and sum below 1, got {valid_share}, {test_share}")
    n = len(table)
    if n == 0:
        raise ValueError("cannot split an empty review table")
    order = _chronological(table, tie_break, seed)
    times = np.sort(np.asarray(table.timestamp, dtype=np.float64))
    valid_start = float(times[min(n - 1, int(np.floor((1.0 - valid_share - test_share) * n)))])
    test_start = float(times[min(n - 1, int(np.floor((1.0 - test_share) * n)))])
    if not times[0] < valid_start < test_start:
        raise ValueError(f"the review times do not allow three periods with shares {valid_share}/{test_share} "
                         f"(cuts {valid_start} and {test_start}, first review {times[0]}): too few distinct times")
    ts = np.asarray(table.timestamp, dtype=np.float64)
    train = np.flatnonzero(ts < valid_start)
    valid_period = np.flatnonzero((ts >= valid_start) & (ts < test_start))
    user_keys = table.user.astype(str)
    has_train = set(user_keys[train].tolist())

    def first_per_user(mask: np.ndarray) -> np.ndarray:
        rows = order[mask[order]]  # by user, then time
        users = user_keys[rows]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = users[1:] != users[:-1]
        return np.array([r for r in rows[first] if user_keys[r] in has_train], dtype=np.int64)

    valid = first_per_user((ts >= valid_start) & (ts < test_start))
    test = first_per_user(ts >= test_start)
    return TemporalSplit(train=train, valid=valid, test=test, valid_period=valid_period, valid_start=valid_start,
                         test_start=test_start, tie_break=tie_break, seed=seed, chronological=order)
