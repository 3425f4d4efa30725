"""Side-by-side latency table for the native core vs numpy float32 and the bandwidth floor.

    python benchmarks/compare_core.py            # full sizes from the issue (needs ~7 GB RAM)
    python benchmarks/compare_core.py --quick    # small sizes, a smoke run

Every row is measured in this one run; ratios compare rows of the same run.
Timings are medians over repeated calls on one thread.
"""

from __future__ import annotations

import argparse
import gc
import time

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # baselines on one thread, like the core

import numpy as np  # noqa: E402

from common import make_catalog, numpy_rerank, numpy_topk, random_queries
from persona4rec.kernels import simd_info, stream_read


def median_times(fn, repeats: int, min_seconds: float = 0.3) -> tuple[float, float]:
    """Median wall and process-CPU seconds per call, after one warm-up, over at least
    `repeats` calls. CPU time is what the call cost; a wall time well above it means the
    shared machine made the call wait."""
    fn()
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < repeats or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if len(walls) > 100_000:
            break
    return float(np.median(walls)), float(np.median(cpus))


def median_time(fn, repeats: int, min_seconds: float = 0.3) -> float:
    """Median wall seconds per call (see median_times)."""
    return median_times(fn, repeats, min_seconds)[0]


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e3:.2f} ms"


def rerank_rows(n_items: int, personas: int, d: int, rows: list, n_sets: int = 512) -> None:
    cat = make_catalog(n_items, personas, d, seed=d)
    q = random_queries(1, d)[0]
    rng = np.random.default_rng(2)
    for n_cand in (100, 500):
        sets = [rng.choice(n_items, n_cand, replace=False).astype(np.int64) for _ in range(n_sets)]
        # Check agreement before timing: same winners up to int8 error on random data.
        s_core, p_core = cat.index.score_candidates(q, sets[0])
        s_np, _ = numpy_rerank(cat.vectors, personas, q, sets[0])
        assert np.max(np.abs(s_core - s_np)) < 0.02

        warm = sets[0]
        t_core_warm = median_times(lambda: cat.index.score_candidates(q, warm), 2000)
        t_np_warm = median_times(lambda: numpy_rerank(cat.vectors, personas, q, warm), 200)
        it = iter(range(10**9))
        t_core_cold = median_times(lambda: cat.index.score_candidates(q, sets[next(it) % n_sets]), 2000)
        it2 = iter(range(10**9))
        t_np_cold = median_times(lambda: numpy_rerank(cat.vectors, personas, q, sets[next(it2) % n_sets]), 200)
        rows.append((f"rerank {n_cand}x{personas} d={d}, same candidates", t_core_warm, t_np_warm))
        rows.append((f"rerank {n_cand}x{personas} d={d}, new candidates per call", t_core_cold, t_np_cold))
    del cat
    gc.collect()


def catalog_rows(n_items: int, personas: int, d: int, k: int, rows: list, floor_rows: list) -> None:
    cat = make_catalog(n_items, personas, d, seed=7)
    queries = random_queries(16, d, seed=3)
    q = queries[:1]
    items, _, _ = cat.index.topk(q, k)
    ref = numpy_topk(cat.vectors, cat.offsets, q[0], k)
    overlap = len(set(items[0].tolist()) & set(ref.tolist())) / k
    assert overlap >= 0.8, overlap

    t_core = median_times(lambda: cat.index.topk(q, k), 15)
    t_np = median_times(lambda: numpy_topk(cat.vectors, cat.offsets, q[0], k), 5)
    t_floor = median_times(lambda: stream_read(cat.codes), 15)
    t_batch = tuple(t / len(queries) for t in median_times(lambda: cat.index.topk(queries, k), 5))
    nbytes = cat.codes.nbytes
    rows.append((f"top-{k} of {n_items:,} items x {personas} personas d={d} (1 query)", t_core, t_np))
    rows.append((f"  same, batch of {len(queries)} queries, per query", t_batch, t_np))
    floor_rows.append((t_core, t_floor, nbytes, t_batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    n_items = 20_000 if args.quick else 200_000
    info = simd_info()
    print(f"persona4rec core: active path {info['active']} (available: {', '.join(info['available'])})")
    rows: list = []
    floor_rows: list = []
    for d in (384, 1024):
        rerank_rows(n_items, 5, d, rows)
    catalog_rows(n_items, 5, 384, 10, rows, floor_rows)

    print()
    print("Wall / process-CPU medians; the speed-up is the ratio of CPU times (what each call cost).")
    print()
    print("| workload | persona4rec wall / CPU | numpy float32 wall / CPU | speed-up (CPU) |")
    print("|---|---:|---:|---:|")
    for name, t_core, t_np in rows:
        print(f"| {name} | {fmt(t_core[0])} / {fmt(t_core[1])} | {fmt(t_np[0])} / {fmt(t_np[1])} | "
              f"{t_np[1] / max(t_core[1], 1e-9):.1f}x |")
    t_core, t_floor, nbytes, t_batch = floor_rows[0]
    print()
    print(f"| full-catalog scan ({nbytes / 2**20:.0f} MiB of int8 codes) | wall / CPU | GB/s (CPU) | vs floor (CPU) |")
    print("|---|---:|---:|---:|")
    for label, t in (("streaming read of the same bytes (floor)", t_floor), ("fused top-10, 1 query", t_core),
                     ("fused top-10, batch of 16, per query", t_batch)):
        print(f"| {label} | {fmt(t[0])} / {fmt(t[1])} | {nbytes / max(t[1], 1e-9) / 1e9:.1f} | "
              f"{t[1] / max(t_floor[1], 1e-9):.2f}x |")

if __name__ == "__main__":
    main()
