"""persona4rec beside the libraries a user would pick instead, on the same data, in one run.

    python benchmarks/compare_peers.py            # 200,000 items x 5 personas (1,000,000 vectors), d=384
    python benchmarks/compare_peers.py --quick    # 20,000 items, a smoke run
    pip install 'persona4rec[bench]'              # the peers; a peer that does not import is reported as skipped

Data: synthetic L2-normalised persona vectors (5 per item, d=384) on a clustered 32-dimensional
subspace plus noise (the generator of compare_index.py; graph search needs the structure real
embeddings have). Every peer gets the same vectors, or int8 codes of them where it takes int8.

Workloads:
  * exact top-10 items (an item scores the max over its personas), 1 query and a batch of 16;
    peers that return personas fetch k' = (k - 1) * 5 + 1 = 46 of them (enough to hold 10
    distinct items) and keep the first occurrence of each item;
  * rerank of 500 candidate items x 5 personas;
  * approximate top-10 at ef=128 (M=16, ef_construction=100 for every graph) over the first
    --ann-items items: recall@10 against the float exact answer, and latency;
  * the streaming read of the int8 codes (persona4rec.kernels.stream_read), the memory floor.

Every row reports the median wall time and the median process CPU time (time.process_time) per
call on one thread (BLAS pinned to one thread; faiss's OpenMP set to one thread), and ratios computed
from CPU time: what a call cost, which a loaded machine disturbs far less than wall time. Results
are checked against the float exact answer before anything is timed.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before numpy loads BLAS; importing this module (tests) leaves the environment alone
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                 "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[_var] = "1"  # every baseline on one thread, like the core's calls here

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import inspect  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from compare_core import fmt, median_times  # noqa: E402
from compare_index import latent_clustered  # noqa: E402
from persona4rec import PersonaIndex  # noqa: E402
from persona4rec.kernels import MaxSimIndex, quantize, simd_info, stream_read  # noqa: E402

P, D, K = 5, 384, 10
K_PERSONAS = (K - 1) * P + 1  # persona hits that always hold K distinct items
EF, M, EF_CONSTRUCTION = 128, 16, 100


def optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Import order matters: usearch's extension carries its own copy of the SimSIMD/NumKong kernels,
# and with usearch loaded first we saw simsimd.cdist reject int8 inputs ("Input tensors must have
# matching datatypes") and numkong run an AVX-VNNI kernel this AVX-512 VNNI CPU lacks (SIGILL).
PEER_MODULES = ("numkong", "simsimd", "faiss", "hnswlib", "usearch.index")


def load_peers(skip: set[str] | frozenset[str] = frozenset()) -> dict:
    """The peer modules that import (None for skipped or missing ones), in the order above."""
    return {m: None if m.split(".")[0] in skip else optional(m) for m in PEER_MODULES}


def installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def pin_blas_threads() -> str:
    """Pin every BLAS/OpenMP pool loaded so far (numpy's, faiss's) to one thread."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return "threadpoolctl not installed; BLAS pinned by environment variables only"
    threadpool_limits(1)
    pools = [f"{p['internal_api']}={p['num_threads']}" for p in threadpool_info()]
    return "thread pools: " + ", ".join(pools)


# ----------------------------------------------------------------------------- helpers
def items_from_personas(labels: np.ndarray, k: int = K) -> np.ndarray:
    """Persona hits (n_queries, k') in score order -> the first k distinct items per query."""
    labels = np.atleast_2d(labels)
    out = np.full((len(labels), k), -1, dtype=np.int64)
    for u, row in enumerate(labels):
        items = np.asarray(row, dtype=np.int64)
        items = items[items >= 0] // P
        _, first = np.unique(items, return_index=True)
        kept = items[np.sort(first)][:k]
        out[u, : len(kept)] = kept
    return out


def top_items(item_scores: np.ndarray, k: int = K) -> np.ndarray:
    """(n_queries, n_items) item scores -> the k best items per query, best first."""
    item_scores = np.atleast_2d(item_scores)
    top = np.argpartition(-item_scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(item_scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def float_exact(vectors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    s = (vectors @ queries.T).T  # (n_queries, n_personas)
    return top_items(s.reshape(len(queries), -1, P).max(axis=2), k)


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    found, truth = np.atleast_2d(found), np.atleast_2d(truth)
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def timed(fn, repeats: int, min_seconds: float = 0.3) -> tuple[float, float]:
    gc.collect()
    return median_times(fn, repeats, min_seconds)


def ratio(a: float, b: float | None) -> str:
    return "" if b is None else f"{a / max(b, 1e-12):.2f}x"


# ----------------------------------------------------------------------------- the data
class Data:
    def __init__(self, n_items: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n_items = n_items
        self.vectors = latent_clustered(rng, n_items * P, D)
        self.codes = np.empty(self.vectors.shape, dtype=np.int8)
        self.scales = np.empty(len(self.vectors), dtype=np.float32)
        for a in range(0, len(self.vectors), 65536):
            b = min(len(self.vectors), a + 65536)
            self.codes[a:b], self.scales[a:b] = quantize(self.vectors[a:b])
        self.offsets = np.arange(0, n_items * P + 1, P, dtype=np.int64)
        self.core = MaxSimIndex(self.codes, self.scales, self.offsets)
        self.queries = latent_clustered(np.random.default_rng(seed + 1), 16, D)
        self.q_codes, self.q_scales = quantize(self.queries)


def scaled_item_scores(dots: np.ndarray, data: Data, q_scales: np.ndarray) -> np.ndarray:
    """int32 code dots (n_queries, n_personas) -> float item scores (max over each item's personas):
    the numpy post-processing a user adds to a bare int8 dot kernel."""
    s = np.asarray(dots, dtype=np.float32) * data.scales
    s *= q_scales[:, None]
    return s.reshape(len(s), -1, P).max(axis=2)


# ----------------------------------------------------------------------------- exact top-10
def exact_peers(data: Data, faiss, usearch_index, numkong, simsimd) -> list[tuple]:
    """(name, search(queries) -> (n, K) items, note); the call is what gets timed."""
    peers: list[tuple] = [
        ("persona4rec `MaxSimIndex.topk` (int8)", lambda q: data.core.topk(q, K)[0], ""),
        ("numpy float32 (matvec/GEMM + max per item + argpartition)",
         lambda q: top_items((data.vectors @ q.T).T.reshape(len(q), -1, P).max(axis=2)), ""),
    ]
    if faiss is not None:
        flat = faiss.IndexFlatIP(D)
        flat.add(data.vectors)
        sq8 = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq8.train(data.vectors[: min(len(data.vectors), 200_000)])
        sq8.add(data.vectors)
        peers.append(("faiss `IndexFlatIP` (float32, k'=46 + item dedup)",
                      lambda q: items_from_personas(flat.search(q, K_PERSONAS)[1]), ""))
        peers.append(("faiss `IndexScalarQuantizer` QT_8bit (k'=46 + item dedup)",
                      lambda q: items_from_personas(sq8.search(q, K_PERSONAS)[1]), ""))
    if usearch_index is not None:
        # usearch's own int8 convention for unit vectors: one global scale of 127.
        u_codes = np.clip(np.rint(data.vectors * 127), -127, 127).astype(np.int8)
        peers.append(("usearch exact `search` i8 (x127 codes, k'=46 + item dedup)",
                      lambda q: items_from_personas(usearch_index.search(
                          u_codes, np.clip(np.rint(q * 127), -127, 127).astype(np.int8), K_PERSONAS,
                          usearch_index.MetricKind.IP, exact=True, threads=1).keys), ""))
    if numkong is not None:
        packed = numkong.dots_pack(data.codes, dtype="int8")

        def numkong_packed(q):
            qc, qs = quantize(q)
            return top_items(scaled_item_scores(numkong.dots_packed(qc, packed), data, qs))

        def numkong_cdist(q):
            qc, qs = quantize(q)
            return top_items(scaled_item_scores(numkong.cdist(qc, data.codes, metric="dot", out_dtype="int32"),
                                                data, qs))

        peers.append(("numkong `dots_packed` i8 (packed GEMM) + numpy post-processing", numkong_packed, ""))
        peers.append(("numkong `cdist` i8 + numpy post-processing", numkong_cdist, ""))
    if simsimd is not None:
        def simsimd_cdist(q):
            qc, qs = quantize(q)
            return top_items(scaled_item_scores(
                simsimd.cdist(qc, data.codes, metric="dot", out_dtype="int32", threads=1), data, qs))

        peers.append(("simsimd `cdist` i8 + numpy post-processing", simsimd_cdist, ""))
    return peers


def exact_tables(data: Data, peers: list[tuple], numkong, floor: tuple[float, float]) -> None:
    truth1 = float_exact(data.vectors, data.queries[:1])
    truth16 = float_exact(data.vectors, data.queries)
    results = []
    for name, search, note in peers:
        ov1 = overlap(search(data.queries[:1]), truth1)
        ov16 = overlap(search(data.queries), truth16)
        if ov16 < 0.6:
            raise SystemExit(f"{name}: top-10 overlap with the float exact answer is {ov16:.2f}; not timing it")
        q1, q16 = data.queries[:1], data.queries
        t1 = timed(lambda: search(q1), 7)
        t16 = timed(lambda: search(q16), 3)
        results.append((name, ov1, ov16, t1, tuple(t / 16 for t in t16)))
        print(f"  timed {name}", flush=True)
    if numkong is not None:
        packed = numkong.dots_pack(data.codes, dtype="int8")
        qc = data.q_codes
        t = timed(lambda: numkong.dots_packed(qc, packed), 3)
        kernel_only = tuple(x / 16 for x in t)
        del packed
    else:
        kernel_only = None
    n = len(data.codes)
    base1, base16 = results[0][3][1], results[0][4][1]
    for title, col, ov_col in ((f"Exact top-{K} items over {data.n_items:,} items x {P} personas, 1 query", 3, 1),
                               (f"Exact top-{K} items, batch of 16 queries, per query", 4, 2)):
        base = base1 if col == 3 else base16
        print(f"\n{title} ({n:,} persona vectors, d={D}; floor = streaming read of the "
              f"{data.codes.nbytes / 2**20:.0f} MiB of int8 codes)\n")
        print("| method | top-10 overlap with float exact | wall | CPU | CPU vs persona4rec | CPU vs floor |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| streaming-read floor (`stream_read`) | | {fmt(floor[0])} | {fmt(floor[1])} | "
              f"{ratio(floor[1], base)} | 1.00x |")
        for row in results:
            w, c = row[col]
            print(f"| {row[0]} | {row[ov_col]:.2f} | {fmt(w)} | {fmt(c)} | {ratio(c, base)} | {ratio(c, floor[1])} |")
        if col == 4 and kernel_only is not None:
            w, c = kernel_only
            print(f"| numkong `dots_packed` i8 kernel alone (int32 dots, no item scores, no top-k) | | {fmt(w)} | "
                  f"{fmt(c)} | {ratio(c, base)} | {ratio(c, floor[1])} |")


# ----------------------------------------------------------------------------- rerank
def rerank_table(data: Data, numkong, simsimd, n_cand: int = 500, n_sets: int = 256) -> None:
    rng = np.random.default_rng(5)
    sets = [np.sort(rng.choice(data.n_items, n_cand, replace=False)).astype(np.int64) for _ in range(n_sets)]
    q = data.queries[0]
    offsets_p = np.arange(P)

    def rows_of(cand):
        return (cand[:, None] * P + offsets_p).reshape(-1)

    def from_dots(dots, cand, q_scale):
        s = np.asarray(dots, dtype=np.float32).reshape(-1) * data.scales[rows_of(cand)] * q_scale
        return s.reshape(len(cand), P).max(axis=1)

    methods = [("persona4rec `MaxSimIndex.score_candidates` (int8)", lambda c: data.core.score_candidates(q, c)[0]),
               ("numpy float32 (gather + matvec + max)",
                lambda c: (data.vectors[rows_of(c)] @ q).reshape(len(c), P).max(axis=1))]
    if numkong is not None:
        methods.append(("numkong `cdist` i8 on gathered rows + numpy", lambda c: from_dots(
            numkong.cdist(quantize(q[None])[0], data.codes[rows_of(c)], metric="dot", out_dtype="int32"), c,
            quantize(q[None])[1][0])))
    if simsimd is not None:
        methods.append(("simsimd `cdist` i8 on gathered rows + numpy", lambda c: from_dots(
            simsimd.cdist(quantize(q[None])[0], data.codes[rows_of(c)], metric="dot", out_dtype="int32", threads=1),
            c, quantize(q[None])[1][0])))

    truth = sets[0][np.argsort(-(data.vectors[rows_of(sets[0])] @ q).reshape(-1, P).max(axis=1))[:K]]
    rows = []
    for name, score in methods:
        s = score(sets[0])
        ov = overlap(sets[0][np.argsort(-s, kind="stable")[:K]], truth)
        warm = timed(lambda: score(sets[0]), 200)
        it = iter(range(10**9))
        cold = timed(lambda: score(sets[next(it) % n_sets]), 200)
        rows.append((name, ov, warm, cold))
    print(f"\nRerank {n_cand} candidate items x {P} personas (d={D}); 'same' reuses one candidate list (rows in "
          f"cache), 'new' rotates through {n_sets} lists (rows from DRAM)\n")
    print("| method | top-10 overlap with float | same: wall | same: CPU | same: CPU vs persona4rec | "
          "new: wall | new: CPU | new: CPU vs persona4rec |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ov, warm, cold in rows:
        print(f"| {name} | {ov:.2f} | {fmt(warm[0])} | {fmt(warm[1])} | {ratio(warm[1], rows[0][2][1])} | "
              f"{fmt(cold[0])} | {fmt(cold[1])} | {ratio(cold[1], rows[0][3][1])} |")


# ----------------------------------------------------------------------------- approximate
def ann_table(data: Data, n_ann_items: int, build_threads: int, hnswlib, faiss, usearch_index,
              n_users: int = 200) -> None:
    n = n_ann_items * P
    vectors = np.ascontiguousarray(data.vectors[:n])
    users = latent_clustered(np.random.default_rng(99), n_users, D)
    truth = float_exact(vectors, users)
    methods = []  # (name, build seconds, query(u) -> items (K,))

    index = PersonaIndex.build(list(range(n_ann_items)), vectors, np.arange(0, n + 1, P))
    t0 = time.perf_counter()
    index.build_ann(M=M, ef_construction=EF_CONSTRUCTION, ef=EF, n_threads=build_threads)
    t_p4r = time.perf_counter() - t0
    exact_core = MaxSimIndex(data.codes[:n], data.scales[:n], np.arange(0, n + 1, P, dtype=np.int64))
    methods.append(("persona4rec exact int8 scan (`topk`), for reference", None,
                    lambda u: exact_core.topk(u[None], K)[0][0]))
    has_overfetch = "overfetch" in inspect.signature(index.search_approx).parameters

    def p4r(u, **kw):
        ids, _ = index.search_approx(u, k=K, ef=EF, **kw)
        return np.asarray(ids, dtype=np.int64)

    methods.append(("persona4rec `search_approx` (hnswlib graph on dequantized int8 + int8 re-score), "
                    "default overfetch", t_p4r, p4r))
    if has_overfetch:
        methods.append(("persona4rec `search_approx`, overfetch=5 (50 personas)", t_p4r,
                        lambda u: p4r(u, overfetch=5)))
    del vectors  # the peers below copy what they need
    if hnswlib is not None:
        g = hnswlib.Index(space="ip", dim=D)
        g.init_index(max_elements=n, ef_construction=EF_CONSTRUCTION, M=M, random_seed=0)
        g.set_num_threads(build_threads)
        t0 = time.perf_counter()
        g.add_items(data.vectors[:n], np.arange(n))
        t_build = time.perf_counter() - t0
        g.set_ef(EF)
        g.set_num_threads(1)
        methods.append(("hnswlib float32 (k'=46 + item dedup)", t_build,
                        lambda u: items_from_personas(g.knn_query(u[None], k=K_PERSONAS, num_threads=1)[0])[0]))
    if faiss is not None:
        fh = faiss.IndexHNSWFlat(D, M, faiss.METRIC_INNER_PRODUCT)
        fh.hnsw.efConstruction = EF_CONSTRUCTION
        faiss.omp_set_num_threads(build_threads)
        t0 = time.perf_counter()
        fh.add(data.vectors[:n])
        t_build = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        fh.hnsw.efSearch = EF
        methods.append(("faiss `IndexHNSWFlat` float32 (k'=46 + item dedup)", t_build,
                        lambda u: items_from_personas(fh.search(u[None], K_PERSONAS)[1])[0]))
    if usearch_index is not None:
        ui = usearch_index.Index(ndim=D, metric=usearch_index.MetricKind.IP, dtype=usearch_index.ScalarKind.F32,
                                 connectivity=M, expansion_add=EF_CONSTRUCTION, expansion_search=EF)
        t0 = time.perf_counter()
        ui.add(np.arange(n), data.vectors[:n], threads=build_threads)
        t_build = time.perf_counter() - t0
        methods.append(("usearch HNSW float32 (k'=46 + item dedup)", t_build,
                        lambda u: items_from_personas(ui.search(u, K_PERSONAS, threads=1).keys)[0]))

    rows = []
    for name, t_build, query in methods:
        recall = overlap(np.stack([np.pad(query(u), (0, K))[:K] for u in users]), truth)
        it = iter(range(10**9))
        t = timed(lambda: query(users[next(it) % n_users]), 200)
        rows.append((name, t_build, recall, t))
        print(f"  timed {name}", flush=True)
    base = rows[1][3][1]
    print(f"\nApproximate top-{K} over the first {n_ann_items:,} items ({n:,} personas, d={D}); every graph M={M}, "
          f"ef_construction={EF_CONSTRUCTION}, ef={EF}; recall@{K} against the float exact answer over "
          f"{n_users} users; latency per single query, rotating through the users\n")
    print("| method | build (s, wall, {} threads) | recall@10 vs float exact | wall | CPU | "
          "CPU vs persona4rec `search_approx` |".format(build_threads))
    print("|---|---:|---:|---:|---:|---:|")
    for name, t_build, recall, t in rows:
        b = "" if t_build is None else f"{t_build:.0f}"
        print(f"| {name} | {b} | {recall:.4f} | {fmt(t[0])} | {fmt(t[1])} | {ratio(t[1], base)} |")


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20,000 items instead of 200,000")
    parser.add_argument("--items", type=int, default=None, help="catalog size in items (5 personas each)")
    parser.add_argument("--ann-items", type=int, default=None,
                        help="items in the approximate-search catalog (default 40,000 = 200,000 personas; "
                             "4,000 with --quick)")
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1,
                        help="threads for graph builds only; every query runs on one thread")
    parser.add_argument("--skip-ann", action="store_true", help="skip the (slow to build) graphs")
    parser.add_argument("--skip-peers", default="", help="comma-separated modules not to import, e.g. numkong,faiss")
    args = parser.parse_args()
    n_items = args.items or (20_000 if args.quick else 200_000)
    n_ann = min(n_items, args.ann_items or (4_000 if args.quick else 40_000))

    skipped = {m.strip() for m in args.skip_peers.split(",") if m.strip()}
    modules = load_peers(skipped)
    faiss, hnswlib, numkong, simsimd = (modules[m] for m in ("faiss", "hnswlib", "numkong", "simsimd"))
    usearch_index = modules["usearch.index"]
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    pools = pin_blas_threads()
    info = simd_info()
    print(f"persona4rec SIMD path: {info['active']} (available: {', '.join(info['available'])}); "
          f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")
    versions = [f"numpy {np.__version__}"]
    for name, mod in (("faiss-cpu", faiss), ("hnswlib", hnswlib), ("numkong", numkong), ("simsimd", simsimd),
                      ("usearch", usearch_index)):
        versions.append(f"{name} {installed_version(name)}" if mod is not None else f"{name} SKIPPED "
                        "(--skip-peers, or not installed: pip install 'persona4rec[bench]')")
    print("peers: " + "; ".join(versions))
    print(pools)
    if numkong is not None:
        caps = [k for k, v in numkong.get_capabilities().items() if v]
        print(f"numkong capabilities: {', '.join(caps)}")

    t0 = time.perf_counter()
    data = Data(n_items)
    print(f"data: {n_items:,} items x {P} personas, d={D}, generated in {time.perf_counter() - t0:.1f} s", flush=True)
    floor = timed(lambda: stream_read(data.codes), 15)

    peers = exact_peers(data, faiss, usearch_index, numkong, simsimd)
    exact_tables(data, peers, numkong, floor)
    del peers
    gc.collect()
    rerank_table(data, numkong, simsimd)
    if not args.skip_ann:
        ann_table(data, n_ann, args.build_threads, hnswlib, faiss, usearch_index)
    print("\nRatios are of CPU times from this one run; 'vs persona4rec' > 1 means the peer spent more CPU.")


if __name__ == "__main__":
    main()
