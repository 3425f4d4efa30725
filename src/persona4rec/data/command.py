"""`persona4rec data heldout`: write the review ids a split holds out (for `llm --exclude-review-ids`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    parser = sub.add_parser("data", help="dataset utilities", description=__doc__)
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = commands.add_parser("heldout", help="write the held-out (validation and test) review ids of a split",
                            description="Write the ids of the reviews that a split keeps out of training, one per "
                                        "line, with the cleaning of `persona4rec evaluate`. Pass the file to the "
                                        "LLM stages as --exclude-review-ids.")
    p.add_argument("--dataset", required=True, help="registered dataset name, e.g. amazon-mi-5core")
    p.add_argument("--split", required=True, choices=["loo", "temporal"],
                   help="loo: leave-one-out by time (evaluate's default); temporal: two global time cuts")
    p.add_argument("--tie-break", choices=["random", "file"], default="random",
                   help="order of same-timestamp reviews, as in `evaluate` (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tie-break (default: %(default)s)")
    p.add_argument("--k-core", type=int, default=5, help="k-core applied before the split (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset files")
    p.add_argument("--out", required=True, help="output file (one review id per line)")
    p.set_defaults(func=run_heldout)


def run_heldout(args: argparse.Namespace) -> int:
    from persona4rec.data.heldout import heldout_review_ids, write_review_ids

    try:
        ids = heldout_review_ids(args.dataset, args.split, args.tie_break, args.seed, args.data_dir, args.k_core)
    except (KeyError, ValueError, OSError) as exc:
        print(f"data heldout: {exc}", file=sys.stderr)
        return 2
    comment = (f"held-out reviews of {args.dataset}, split {args.split}, tie-break {args.tie_break}, seed "
               f"{args.seed}, k-core {args.k_core}: {len(ids)} ids\n"
               "written by `persona4rec data heldout`; pass to `persona4rec llm ... --exclude-review-ids`")
    path = write_review_ids(ids, args.out, comment)
    print(f"{len(ids)} held-out review ids written to {path}", file=sys.stderr)
    return 0
