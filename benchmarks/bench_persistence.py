"""Persistence costs: checksum throughput, save and load of a large index, in one run.

    python benchmarks/bench_persistence.py            # 1,000,000 personas (200,000 items x 5), d=384
    python benchmarks/bench_persistence.py --quick    # 100,000 personas

Every row reports wall time and this process's CPU time (the machines are shared and
noisy: a wall time far above the CPU time means the run waited for the machine). Ratios
compare rows of this run only. Load times are with the file in the page cache (it was
just written), which is the case a serving fleet restarting on one host sees.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from persona4rec import PersonaIndex, simd_info
from persona4rec._core import checksum64, checksum64_v1, find_int8_min


def timed(fn, repeats: int = 3):
    """Best wall and CPU seconds over repeats, and the last result."""
    best_wall = best_cpu = float("inf")
    out = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    return best_wall, best_cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_items = 20_000 if args.quick else 200_000
    per_item, d = 5, 384
    n = n_items * per_item
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, d), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    offsets = np.arange(0, n + 1, per_item, dtype=np.int64)
    ids = [f"B{i:08d}" for i in range(n_items)]
    index = PersonaIndex.build(ids, vectors, offsets)
    del vectors
    codes = index._snap.codes
    print(f"# {n:,} personas ({n_items:,} items x {per_item}), d={d}, codes {codes.nbytes / 1e6:.0f} MB; "
          f"SIMD {simd_info()['active']}; cpu count {os.cpu_count()}")
    print("| operation | wall | CPU | throughput |")
    print("|---|---|---|---|")
    for name, fn in (("checksum64 (format 2)", checksum64), ("checksum64_v1 (format 1)", checksum64_v1)):
        wall, cpu, _ = timed(lambda f=fn: f(codes))
        print(f"| {name} over the codes | {wall * 1e3:.1f} ms | {cpu * 1e3:.1f} ms | {codes.nbytes / wall / 1e9:.1f} GB/s |")
    small = codes[: (1 << 20) // d]
    wall, cpu, _ = timed(lambda: [checksum64(small) for _ in range(200)])
    print(f"| checksum64, 1 MB in cache, x200 | {wall * 1e3:.1f} ms | {cpu * 1e3:.1f} ms | "
          f"{200 * small.nbytes / wall / 1e9:.1f} GB/s |")
    wall, cpu, _ = timed(lambda: find_int8_min(codes))
    print(f"| -128 scan of the codes (every load) | {wall * 1e3:.1f} ms | {cpu * 1e3:.1f} ms | "
          f"{codes.nbytes / wall / 1e9:.1f} GB/s |")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.p4r"
        wall, cpu, _ = timed(lambda: index.save(path), repeats=2)
        size = path.stat().st_size
        print(f"| save ({size / 1e6:.0f} MB file, fsync included) | {wall * 1e3:.0f} ms | {cpu * 1e3:.0f} ms | "
              f"{size / wall / 1e9:.2f} GB/s |")
        for mmap, verify in ((True, False), (True, True), (False, True)):
            wall, cpu, loaded = timed(lambda m=mmap, v=verify: PersonaIndex.load(path, mmap=m, verify=v))
            print(f"| load mmap={mmap} verify={verify} | {wall * 1e3:.1f} ms | {cpu * 1e3:.1f} ms | "
                  f"{size / wall / 1e9:.1f} GB/s |")
        q = rng.standard_normal(d).astype(np.float32)
        assert (loaded.search(q, k=10)[0] == index.search(q, k=10)[0]).all()


if __name__ == "__main__":
    main()
