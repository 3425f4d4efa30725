"""Cleaning (duplicates, k-core) and the leave-one-out split by time.

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

    def describe(self) -> str:
        return f"leave-one-out by time, tie-break={self.tie_break}" + (
            f" (seed {self.seed})" if self.tie_break == "random" else "")


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
