"""Per-SIMD-path scan timings and the string-id rerank overhead, in one run.

    python benchmarks/kernel_paths.py             # 200,000 items x 5 personas, d=384
    python benchmarks/kernel_paths.py --quick     # 20,000 items

For every kernel path this CPU has: the stream-read floor, exact top-10 for one query, and
per query in a batch of 16 (the tiled kernel). Then `PersonaIndex.rerank` of 100 string-id
candidates x 5 personas against the raw core call on the same candidates. Best of repeats,
wall and process CPU time; ratios from CPU time (the machines are shared and noisy).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from common import make_catalog, random_queries  # noqa: E402
from persona4rec import PersonaIndex  # noqa: E402
from persona4rec.kernels import forced_simd, simd_info, stream_read  # noqa: E402


def best_times(fn, repeats: int = 5) -> tuple[float, float]:
    """Best wall and best CPU seconds over repeats (after one warm-up)."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu


def median_us(fn, repeats: int = 3000) -> tuple[float, float]:
    """Median wall and CPU microseconds per call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)) * 1e6, float(np.median(cpus)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_items = 20_000 if args.quick else 200_000
    cat = make_catalog(n_items, 5, 384)
    queries = random_queries(16, 384)
    info = simd_info()
    print(f"# {n_items:,} items x 5 personas, d=384; paths available: {', '.join(info['available'])}")
    print("| path | floor wall / CPU | 1 query wall / CPU | vs floor (CPU) | batch 16, per query wall / CPU "
          "| vs floor (CPU) |")
    print("|---|---|---|---|---|---|")
    for path in info["available"]:
        with forced_simd(path):
            floor = best_times(lambda: stream_read(cat.codes))
            one = best_times(lambda: cat.index.topk(queries[:1], 10))
            batch = tuple(t / 16 for t in best_times(lambda: cat.index.topk(queries, 10)))
        print(f"| {path} | {floor[0] * 1e3:.1f} / {floor[1] * 1e3:.1f} ms | {one[0] * 1e3:.1f} / {one[1] * 1e3:.1f} ms "
              f"| {one[1] / floor[1]:.2f}x | {batch[0] * 1e3:.2f} / {batch[1] * 1e3:.2f} ms "
              f"| {batch[1] / floor[1]:.2f}x |")

    rng = np.random.default_rng(0)
    ids = [f"B{i:07d}" for i in range(n_items)]
    index = PersonaIndex.build(ids, cat.vectors, cat.offsets)
    pick = rng.choice(n_items, 100, replace=False)
    cand = [ids[i] for i in pick]
    dense = np.asarray(pick, dtype=np.int64)
    q = queries[0]
    core = index._snap.core  # the raw native call on dense indices, for the overhead ratio
    by_id = median_us(lambda: index.rerank(q, cand))
    raw = median_us(lambda: core.score_candidates(q, dense))
    print()
    print("| rerank 100 x 5, d=384 | wall µs | CPU µs |")
    print("|---|---|---|")
    print(f"| PersonaIndex.rerank, string ids | {by_id[0]:.1f} | {by_id[1]:.1f} |")
    print(f"| raw core score_candidates, dense indices | {raw[0]:.1f} | {raw[1]:.1f} |")
    print(f"| ratio (CPU) | | {by_id[1] / raw[1]:.2f}x |")


if __name__ == "__main__":
    main()
