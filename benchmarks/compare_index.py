"""PersonaIndex benchmarks: public-class overhead, load time, approximate vs exact search.

    python benchmarks/compare_index.py                 # issue sizes: 200,000 items x 5, d=384
    python benchmarks/compare_index.py --quick         # 20,000 items, a smoke run
    python benchmarks/compare_index.py --skip-ann      # without the (slow to build) hnswlib graph

All rows come from this one run. Latencies are medians of repeated single-thread calls.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from compare_core import fmt, median_time  # noqa: E402
from persona4rec import PersonaIndex, simd_info  # noqa: E402


def latent_clustered(rng, n: int, d: int, n_clusters: int = 1000, latent: int = 32, chunk: int = 100_000):
    """Unit vectors on a low-dimensional clustered subspace plus noise (like real embeddings)."""
    basis = np.linalg.qr(np.random.default_rng(123).standard_normal((d, latent)))[0].astype(np.float32)
    centres = np.random.default_rng(321).standard_normal((n_clusters, latent)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        z = centres[rng.integers(0, n_clusters, size=b - a)] + 0.5 * rng.standard_normal((b - a, latent), dtype=np.float32)
        v = z @ basis.T + 0.05 * rng.standard_normal((b - a, d), dtype=np.float32) / np.sqrt(d)
        out[a:b] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-ann", action="store_true")
    parser.add_argument("--ann-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    n_items = 20_000 if args.quick else 200_000
    P, d = 5, 384
    print(f"kernel path: {simd_info()['active']}; {n_items:,} items x {P} personas, d={d}")
    rng = np.random.default_rng(0)
    vectors = latent_clustered(rng, n_items * P, d)
    ids = [f"B{i:08d}" for i in range(n_items)]
    t0 = time.perf_counter()
    index = PersonaIndex.build(ids, vectors, np.arange(0, n_items * P + 1, P))
    print(f"build (quantize + id columns): {time.perf_counter() - t0:.2f} s")
    user = latent_clustered(np.random.default_rng(1), 1, d)[0]

    rows = []
    core = index._snap.core
    for n_cand in (100, 500):
        idx = np.random.default_rng(n_cand).choice(n_items, n_cand, replace=False).astype(np.int64)
        cand = [ids[i] for i in idx]
        t_core = median_time(lambda: core.score_candidates(user, idx), 3000)
        t_cls = median_time(lambda: index.rerank(user, cand), 3000)
        rows.append((f"rerank {n_cand}x{P}: raw core call", t_core, None))
        rows.append((f"rerank {n_cand}x{P}: PersonaIndex.rerank (str ids)", t_cls, t_cls / t_core))
    t_core = median_time(lambda: core.topk(user[None, :], 10), 10)
    t_cls = median_time(lambda: index.search(user, k=10), 10)
    rows.append(("top-10 over the catalog: raw core call", t_core, None))
    rows.append(("top-10 over the catalog: PersonaIndex.search", t_cls, t_cls / t_core))

    print("\n| operation | median | vs raw core |\n|---|---:|---:|")
    for name, t, ratio in rows:
        print(f"| {name} | {fmt(t)} | {'' if ratio is None else f'{ratio:.2f}x'} |")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.p4r"
        t0 = time.perf_counter()
        index.save(path)
        t_save = time.perf_counter() - t0
        size = path.stat().st_size
        loads = []
        for mmap, verify in ((True, True), (True, False), (False, True)):
            PersonaIndex.load(path, mmap=mmap, verify=verify)  # warm the page cache
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                loaded = PersonaIndex.load(path, mmap=mmap, verify=verify)
                times.append(time.perf_counter() - t0)
                del loaded
            loads.append((mmap, verify, float(np.median(times))))
        print(f"\nsave: {t_save:.2f} s, file {size / 2**20:.0f} MiB ({n_items * P:,} personas)")
        print("\n| load | median |\n|---|---:|")
        for mmap, verify, t in loads:
            print(f"| mmap={mmap}, verify={verify} | {fmt(t)} |")

    if args.skip_ann:
        return
    t0 = time.perf_counter()
    index.build_ann(n_threads=args.ann_threads)
    t_build = time.perf_counter() - t0
    users = latent_clustered(np.random.default_rng(2), 200, d)
    t_exact = median_time(lambda: index.search(users[0], k=10), 10)
    print(f"\nhnswlib graph build (M=16, ef_construction=100, {args.ann_threads} threads): {t_build:.0f} s")
    print("\n| search | recall@10 | median latency | speed vs exact |\n|---|---:|---:|---:|")
    print(f"| exact (fused int8 scan) | 1.000 | {fmt(t_exact)} | 1.0x |")
    for ef in (64, 128, 256):
        recall = index.recall_at_k(users, k=10, ef=ef)
        t = median_time(lambda: index.search_approx(users[0], k=10, ef=ef), 200)
        print(f"| approximate, ef={ef} | {recall:.3f} | {fmt(t)} | {t_exact / t:.1f}x |")


if __name__ == "__main__":
    main()
