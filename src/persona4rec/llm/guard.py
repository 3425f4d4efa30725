"""The leakage guard of the LLM stages: which reviews must never reach a prompt.

A stage that reads reviews refuses to run unless it is told which reviews an evaluation
holds out (a file of ids, or a split to compute them from) or is explicitly allowed to read
them all (production personas no evaluation will use). The command line and the Ray
pipeline both take the guard from here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["LeakageGuardMissing", "leakage_guard"]


class LeakageGuardMissing(ValueError):
    """A stage that reads reviews was started without saying which reviews are held out."""


def leakage_guard(args: argparse.Namespace) -> tuple[set[str], str | None]:
    """(review ids to exclude, a description recorded in every record) from the guard options.

    Refuses to run when none is given: a forgotten exclusion silently leaks the evaluation's
    held-out reviews into the personas.
    """
    if not hasattr(args, "allow_heldout"):
        return set(), None  # this stage reads no reviews
    from . import inputs

    chosen = [name for name, given in (("--exclude-review-ids", args.exclude_review_ids), ("--split", args.split),
                                       ("--allow-heldout", args.allow_heldout)) if given]
    if not chosen:
        raise LeakageGuardMissing(
            "no leakage guard: this stage reads reviews, and held-out reviews must not reach the prompts. Pass "
            "--exclude-review-ids FILE (write one with `persona4rec data heldout --dataset D --split loo --out "
            "held_out.txt`), or --split loo|temporal [--dataset D], or --allow-heldout for production personas "
            "that no evaluation will use")
    if len(chosen) > 1:
        raise ValueError(f"give only one of {' / '.join(chosen)}")
    if args.exclude_review_ids:
        excluded = inputs.load_review_ids(args.exclude_review_ids)
        return excluded, f"exclude-review-ids {Path(args.exclude_review_ids).name} ({len(excluded)} ids)"
    if args.split:
        from persona4rec.data.heldout import heldout_review_ids

        excluded = heldout_review_ids(args.dataset, args.split, args.split_tie_break, args.split_seed, args.data_dir)
        return excluded, (f"split {args.split} of {args.dataset}, tie-break {args.split_tie_break}, seed "
                          f"{args.split_seed} ({len(excluded)} held-out ids)")
    return set(), "allow-heldout"
