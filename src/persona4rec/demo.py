"""`persona4rec demo`: build a random persona index, print a top-k list and a latency table.

A self-contained smoke run of the serving path (no model, no data): random unit persona
vectors stand in for encoded personas.
"""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="build a random persona index; print top-k and latencies")
    p.add_argument("--items", type=int, default=200_000, help="catalog size (default 200,000)")
    p.add_argument("--personas", type=int, default=5, help="personas per item (default 5)")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension (default 384)")
    p.add_argument("--k", type=int, default=10, help="how many items to recommend (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _median_us(fn, calls: int) -> float:
    import numpy as np

    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def run(args) -> int:
    import numpy as np

    from persona4rec import PersonaIndex, simd_info

    if args.items < 1 or args.personas < 1 or args.dim < 1 or args.k < 1:
        raise SystemExit("demo: --items, --personas, --dim and --k must be positive")
    rng = np.random.default_rng(args.seed)
    n = args.items * args.personas
    t0 = time.perf_counter()
    vectors = rng.standard_normal((n, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    item_ids = [f"item{i:07d}" for i in range(args.items)]
    offsets = np.arange(0, n + 1, args.personas, dtype=np.int64)
    index = PersonaIndex.build(item_ids, vectors, offsets)
    del vectors
    build_s = time.perf_counter() - t0
    info = simd_info()
    print(f"built a random persona index: {args.items:,} items x {args.personas} personas, d={args.dim} "
          f"({index.memory_bytes / 2**20:.0f} MiB int8) in {build_s:.1f} s; kernel path: {info['active']}")

    user = rng.standard_normal(args.dim, dtype=np.float32)
    user /= np.linalg.norm(user)
    seen = rng.choice(args.items, 20, replace=False)
    ids, scores = index.search(user, k=args.k, exclude=[item_ids[i] for i in seen])
    print(f"\ntop-{args.k} for one random user (20 seen items excluded):")
    for rank, (item, score) in enumerate(zip(ids, scores), 1):
        print(f"  {rank:2d}. {item}  score {score:.4f}")

    candidates = [item_ids[i] for i in rng.choice(args.items, 100, replace=False)]
    batch = rng.standard_normal((16, args.dim), dtype=np.float32)
    batch /= np.linalg.norm(batch, axis=1, keepdims=True)
    rows = [
        ("rerank 100 candidates (PersonaIndex.rerank)", _median_us(lambda: index.rerank(user, candidates), 2000)),
        (f"top-{args.k} over the catalog, 1 user", _median_us(lambda: index.search(user, k=args.k), 10)),
        (f"top-{args.k} over the catalog, batch of 16, per user",
         _median_us(lambda: index.search(batch, k=args.k), 5) / 16),
    ]
    print("\n| operation | median latency |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:,.1f} us |")
    return 0
