"""pytest-benchmark suite for the native core, each benchmark next to a correctness check.

    python -m pytest benchmarks/test_bench_core.py --benchmark-group-by=group

Sizes follow the issue (200,000 items x 5 personas); set PERSONA4REC_BENCH_ITEMS to shrink.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from common import make_catalog, numpy_rerank, numpy_topk, random_queries
from persona4rec.kernels import stream_read

N_ITEMS = int(os.environ.get("PERSONA4REC_BENCH_ITEMS", "200000"))
PERSONAS = 5


@pytest.fixture(scope="module", params=[384, 1024], ids=lambda d: f"d{d}")
def catalog(request):
    return make_catalog(N_ITEMS, PERSONAS, request.param, seed=request.param)


@pytest.mark.parametrize("n_candidates", [100, 500])
@pytest.mark.parametrize("impl", ["persona4rec", "numpy"])
def test_rerank(benchmark, catalog, n_candidates, impl):
    d = catalog.vectors.shape[1]
    benchmark.group = f"rerank {n_candidates}x{PERSONAS} d={d}"
    q = random_queries(1, d)[0]
    cand = np.random.default_rng(n_candidates).choice(catalog.n_items, n_candidates, replace=False).astype(np.int64)
    if impl == "persona4rec":
        scores, _ = benchmark(catalog.index.score_candidates, q, cand)
    else:
        scores, _ = benchmark(numpy_rerank, catalog.vectors, PERSONAS, q, cand)
    ref, _ = numpy_rerank(catalog.vectors, PERSONAS, q, cand)
    assert np.max(np.abs(scores - ref)) < 0.02


@pytest.mark.parametrize("impl", ["persona4rec", "persona4rec-batch16", "numpy", "stream-read-floor"])
def test_full_catalog_top10(benchmark, catalog, impl):
    d = catalog.vectors.shape[1]
    if d != 384:
        pytest.skip("the full-catalog benchmark runs at d=384")
    benchmark.group = f"full catalog top-10, {catalog.n_items} items x {PERSONAS} d={d}"
    queries = random_queries(16, d, seed=3)
    ref = numpy_topk(catalog.vectors, catalog.offsets, queries[0], 10)
    if impl == "persona4rec":
        items, _, _ = benchmark(catalog.index.topk, queries[:1], 10)
        assert len(set(items[0]) & set(ref)) >= 8
    elif impl == "persona4rec-batch16":
        items, _, _ = benchmark(catalog.index.topk, queries, 10)
        assert len(set(items[0]) & set(ref)) >= 8
    elif impl == "numpy":
        benchmark(numpy_topk, catalog.vectors, catalog.offsets, queries[0], 10)
    else:
        benchmark(stream_read, catalog.codes)
