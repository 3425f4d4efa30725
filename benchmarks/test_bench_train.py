"""Adapter training and serving cost on one thread (d=384, full W).

    python -m pytest benchmarks/test_bench_train.py -q

* one training epoch over 6,000 synthetic pairs (batch 256, in-batch InfoNCE, masks),
  with and without 5 hard negatives per pair, and with a persona-side map;
* ``Adapter.apply`` on one profile and on a batch of 1,000 (what the profile builder
  and an offline re-mapping pay).

No timing assertions: the numbers are for docs/training.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from persona4rec.train import Adapter, AdapterConfig, TrainingPairs, train_adapter

D = 384
N = 6000


def _pairs(hard: int = 0, seed: int = 0) -> TrainingPairs:
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((N, D)).astype(np.float32)
    pos = rng.standard_normal((N, D)).astype(np.float32)
    hn = rng.standard_normal((N, hard, D)).astype(np.float32) if hard else None
    return TrainingPairs(users, pos, user_ids=rng.integers(0, 1400, N), item_ids=rng.integers(0, 900, N),
                         positive_ids=rng.integers(0, 4500, N), hard_negatives=hn)


@pytest.mark.parametrize("variant", ["user", "hard5", "persona_side"])
def test_one_epoch(benchmark, variant):
    pairs = _pairs(hard=5 if variant == "hard5" else 0)
    cfg = AdapterConfig(epochs=1, batch_size=256, hard_negatives=variant == "hard5",
                        persona_side=variant == "persona_side")
    result = benchmark.pedantic(train_adapter, args=(pairs, cfg), rounds=3, iterations=1)
    assert result.report["epochs_run"] == 1


@pytest.mark.parametrize("batch", [1, 1000])
def test_apply(benchmark, batch):
    rng = np.random.default_rng(1)
    adapter = Adapter(D, {"user.A": (0.01 * rng.standard_normal((D, D))).astype(np.float32)})
    x = rng.standard_normal((batch, D)).astype(np.float32)
    x = x[0] if batch == 1 else x
    out = benchmark(adapter.apply, x)
    assert out.shape == x.shape
