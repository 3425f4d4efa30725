"""`persona4rec demo`: build a random persona index and print top-k and a latency table."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="build a random persona index; print top-k and latencies")
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--personas", type=int, default=5, help="personas per item")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    raise SystemExit("demo: not implemented yet")
