"""Adapter training: loss, gradients, recovery of a known map, persistence, input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from persona4rec.train import Adapter, AdapterConfig, TrainingPairs, infonce_loss, persona_selection_accuracy, train_adapter
from persona4rec.train.adapter import in_batch_valid_mask, init_params


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_loss(params, users, positives, tau, eps, valid, hard=None, hard_valid=None):
    """Row-by-row loss written independently of the vectorised implementation."""

    def side(x, name):
        if f"{name}.A" in params:
            y = x + x @ params[f"{name}.A"]
        elif f"{name}.P" in params:
            y = x + x @ params[f"{name}.P"] @ params[f"{name}.Q"]
        else:
            y = x
        return _unit(y)

    u, p = side(users, "user"), side(positives, "persona")
    b = len(u)
    total = 0.0
    for i in range(b):
        cols = [j for j in range(b) if valid[i, j]]
        logits = [float(u[i] @ p[j]) / tau for j in cols]
        target = [(1 - eps) * (j == i) for j in cols]
        if hard is not None:
            hn = side(hard[i], "persona")
            for h in range(hard.shape[1]):
                if hard_valid[i, h]:
                    logits.append(float(u[i] @ hn[h]) / tau)
                    target.append(0.0)
        logits = np.array(logits)
        target = np.array(target) + eps / len(logits)
        logz = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
        total += -np.sum(target * (logits - logz))
    return total / b


def _random_batch(rng, b=7, d=6, h=3):
    users = rng.standard_normal((b, d))
    positives = rng.standard_normal((b, d))
    hard = rng.standard_normal((b, h, d))
    hard_valid = rng.random((b, h)) > 0.3
    user_ids = np.array([0, 1, 1, 2, 3, 3, 4])[:b]
    item_ids = np.array([5, 6, 7, 5, 8, 9, 9])[:b]
    pos_ids = np.array([10, 11, 12, 13, 14, 15, 12])[:b]
    return users, positives, hard, hard_valid, user_ids, item_ids, pos_ids


def _random_params(rng, d, rank, persona_side, scale=0.3):
    cfg = AdapterConfig(rank=rank, persona_side=persona_side)
    params = init_params(d, cfg, rng)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float64) for k, v in params.items()}


@pytest.mark.parametrize("rank,persona_side,use_hard", [(None, False, False), (None, True, True), (3, True, True), (2, False, True)])
def test_loss_matches_direct_computation(rank, persona_side, use_hard):
    rng = np.random.default_rng(1)
    users, positives, hard, hard_valid, uid, iid, pid = _random_batch(rng)
    params = _random_params(rng, users.shape[1], rank, persona_side)
    valid = in_batch_valid_mask(uid, iid, pid, mask_same_user=True, mask_same_item=True)
    kwargs = dict(hard_negatives=hard, hard_valid=hard_valid) if use_hard else {}
    loss, _, _ = infonce_loss(params, users, positives, temperature=0.2, label_smoothing=0.05, valid=valid, **kwargs)
    ref = _reference_loss(params, users, positives, 0.2, 0.05, valid, *((hard, hard_valid) if use_hard else ()))
    assert loss == pytest.approx(ref, rel=1e-10)


def test_valid_mask_semantics():
    uid = np.array([0, 0, 1, 2])
    iid = np.array([5, 6, 5, 7])
    pid = np.array([1, 2, 3, 1])
    m = in_batch_valid_mask(uid, iid, pid, mask_same_user=True, mask_same_item=False)
    assert m.diagonal().all()
    assert not m[0, 1] and not m[1, 0]  # same user
    assert m[0, 2]  # same item, not masked with mask_same_item=False
    assert not m[0, 3] and not m[3, 0]  # same positive persona: always masked
    m2 = in_batch_valid_mask(uid, iid, pid, mask_same_user=False, mask_same_item=True)
    assert m2[0, 1] and not m2[0, 2] and not m2[0, 3]


def test_identity_loss_without_smoothing_is_plain_cross_entropy():
    rng = np.random.default_rng(2)
    u = _unit(rng.standard_normal((5, 4)))
    p = _unit(rng.standard_normal((5, 4)))
    loss, _, _ = infonce_loss({}, u, p, temperature=0.5, label_smoothing=0.0)
    logits = u @ p.T / 0.5
    expected = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
    assert loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rank,persona_side,use_hard", [(None, False, False), (None, True, True), (3, True, True)])
def test_gradients_match_finite_differences(rank, persona_side, use_hard):
    rng = np.random.default_rng(3)
    users, positives, hard, hard_valid, uid, iid, pid = _random_batch(rng)
    params = _random_params(rng, users.shape[1], rank, persona_side)
    valid = in_batch_valid_mask(uid, iid, pid, mask_same_user=True, mask_same_item=False)
    kwargs = dict(temperature=0.3, label_smoothing=0.05, valid=valid)
    if use_hard:
        kwargs.update(hard_negatives=hard, hard_valid=hard_valid)
    _, grads, _ = infonce_loss(params, users, positives, **kwargs)
    h = 1e-6
    for key, value in params.items():
        num = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[key][idx] += h
            minus[key][idx] -= h
            lp = infonce_loss(plus, users, positives, need_grad=False, **kwargs)[0]
            lm = infonce_loss(minus, users, positives, need_grad=False, **kwargs)[0]
            num[idx] = (lp - lm) / (2 * h)
        assert np.abs(num).max() > 1e-4, f"{key}: finite differences are all ~0, test is vacuous"
        np.testing.assert_allclose(grads[key], num, rtol=1e-5, atol=1e-8, err_msg=key)


def _synthetic(rng, n_items, personas_per_item, d, rotation, noise=0.05):
    """Items with P personas each; a user's vector is its positive persona under a hidden rotation."""
    bank = _unit(rng.standard_normal((n_items * personas_per_item, d))).astype(np.float32)
    ptr = np.arange(0, n_items * personas_per_item + 1, personas_per_item)
    items = np.arange(n_items)
    pos = items * personas_per_item + rng.integers(0, personas_per_item, n_items)
    users = bank[pos] @ rotation.T + noise * rng.standard_normal((n_items, d))
    return TrainingPairs.from_persona_bank(users, bank, ptr, items, pos, user_ids=items)


def test_training_recovers_hidden_linear_map():
    rng = np.random.default_rng(4)
    d, k = 16, 5
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    train = _synthetic(rng, 1500, k, d, rotation)
    val = _synthetic(rng, 300, k, d, rotation)
    test = _synthetic(rng, 500, k, d, rotation)

    untrained = persona_selection_accuracy(Adapter.identity(d), test)
    assert untrained < 0.35  # chance is 1/5

    cfg = AdapterConfig(temperature=0.1, lr=3e-2, epochs=40, batch_size=128, patience=5, seed=0)
    result = train_adapter(train, cfg, val_pairs=val)
    trained = persona_selection_accuracy(result.adapter, test)
    assert trained > 0.95
    rep = result.report
    assert rep["validation_metric"] == "val_persona_selection_accuracy"
    assert rep["data"]["train_pairs"] == 1500 and rep["data"]["val_pairs"] == 300
    assert rep["curve"][0]["epoch"] == 0 and rep["curve"][0]["train_loss"] is None
    assert rep["best_val_metric"] == max(r["val_metric"] for r in rep["curve"])
    json.dumps(rep)  # JSON-ready


def test_low_rank_and_hard_negative_training_also_learn():
    rng = np.random.default_rng(5)
    d, k = 12, 4
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    train = _synthetic(rng, 800, k, d, rotation)
    test = _synthetic(rng, 300, k, d, rotation)
    base = persona_selection_accuracy(Adapter.identity(d), test)
    cfg = AdapterConfig(rank=d, hard_negatives=True, lr=3e-2, epochs=25, batch_size=64, seed=1)
    adapter = train_adapter(train, cfg).adapter
    assert adapter.rank == d
    assert persona_selection_accuracy(adapter, test) > base + 0.4


def test_training_is_deterministic_with_a_seed():
    rng = np.random.default_rng(6)
    d = 8
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    train = _synthetic(rng, 200, 3, d, rotation)
    cfg = AdapterConfig(epochs=3, batch_size=32, lr=1e-2, seed=7)
    a = train_adapter(train, cfg).adapter
    b = train_adapter(train, cfg).adapter
    np.testing.assert_array_equal(a.params["user.A"], b.params["user.A"])
    c = train_adapter(train, AdapterConfig(epochs=3, batch_size=32, lr=1e-2, seed=8)).adapter
    assert not np.array_equal(a.params["user.A"], c.params["user.A"])


def test_early_stopping_keeps_best_and_stops():
    rng = np.random.default_rng(7)
    d = 8
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    train = _synthetic(rng, 200, 3, d, rotation)
    calls = []

    def worse_every_time(adapter):
        calls.append(adapter)
        return -float(len(calls))  # the untrained adapter (first call) is the best

    res = train_adapter(train, AdapterConfig(epochs=50, patience=2, batch_size=32), validate=worse_every_time)
    assert res.report["stopped_early"] and res.report["epochs_run"] == 2
    assert res.report["best_epoch"] == 0
    assert not res.adapter.params["user.A"].any()  # the identity was kept
    assert len(calls) == 3


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(8)
    d = 10
    params = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init_params(d, AdapterConfig(rank=3, persona_side=True), rng).items()}
    a = Adapter(d, params, meta={"note": "x"})
    x = rng.standard_normal((4, d)).astype(np.float32)
    path = tmp_path / "adapter.npz"
    a.save(path)
    b = Adapter.load(path)
    np.testing.assert_array_equal(a.apply(x), b.apply(x))
    np.testing.assert_array_equal(a.apply_persona(x), b.apply_persona(x))
    assert b.rank == 3 and b.has_persona_map and b.meta == {"note": "x"}
    assert not np.allclose(a.apply(x), _unit(x))  # the map is not the identity


def test_load_rejects_other_versions_and_files(tmp_path):
    a = Adapter(4, {"user.A": np.eye(4, dtype=np.float32) * 0.1})
    path = tmp_path / "a.npz"
    a.save(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(bytes(arrays["header"]).decode())
    header["version"] = 99
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="version 99"):
        Adapter.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="no header"):
        Adapter.load(other)


def test_apply_shapes_and_errors():
    a = Adapter(3, {"user.A": np.diag([1.0, 0.0, 0.0]).astype(np.float32)})
    v = a.apply([1.0, 1.0, 0.0])
    assert v.shape == (3,) and v.dtype == np.float32
    np.testing.assert_allclose(v, _unit(np.array([2.0, 1.0, 0.0])), rtol=1e-6)
    m = a(np.ones((2, 3)))
    assert m.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        a.apply(np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        a.apply(np.array([np.nan, 0, 0]))
    with pytest.raises(ValueError, match="shape"):
        a.apply(np.ones((2, 2, 3)))
    with pytest.raises(ValueError):
        Adapter(3, {"user.A": np.ones((2, 2))})
    with pytest.raises(ValueError, match="NaN"):
        Adapter(3, {"user.A": np.full((3, 3), np.nan)})


def test_training_input_errors():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="empty"):
        TrainingPairs(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="shape"):
        TrainingPairs(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        TrainingPairs(np.full((3, 4), np.nan), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="user_ids"):
        TrainingPairs(np.ones((3, 4)), np.ones((3, 4)), user_ids=np.arange(2))
    pairs = TrainingPairs(rng.standard_normal((1, 4)), rng.standard_normal((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        train_adapter(pairs)
    pairs = TrainingPairs(rng.standard_normal((6, 4)), rng.standard_normal((6, 4)))
    with pytest.raises(ValueError, match="hard_negatives"):
        train_adapter(pairs, AdapterConfig(hard_negatives=True))
    with pytest.raises(ValueError, match="temperature"):
        train_adapter(pairs, AdapterConfig(temperature=0))
    with pytest.raises(ValueError, match="persona selection|hard_negatives"):
        persona_selection_accuracy(Adapter.identity(4), pairs)


def test_report_file_written(tmp_path):
    rng = np.random.default_rng(10)
    pairs = TrainingPairs(rng.standard_normal((40, 4)), rng.standard_normal((40, 4)))
    path = tmp_path / "report.json"
    res = train_adapter(pairs, AdapterConfig(epochs=2, batch_size=8), report_path=path)
    on_disk = json.loads(path.read_text())
    assert on_disk["epochs_run"] == 2 and len(on_disk["curve"]) == 2
    assert on_disk["config"]["batch_size"] == 8
    assert on_disk["data"]["batches_per_epoch"] == 5
    assert res.report["validation_metric"] is None


def test_adapter_is_a_profiler_transform():
    from persona4rec.profile import Interaction, UserProfiler

    class Enc:
        dim = 6
        fingerprint = "toy-encoder"

        def encode(self, texts, batch_size=32):
            out = np.array([[len(t), t.count("a"), t.count("e"), 1.0, t.count(" "), t.count("o")] for t in texts],
                           np.float32)
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    rng = np.random.default_rng(11)
    adapter = Adapter(6, {"user.A": (0.5 * rng.standard_normal((6, 6))).astype(np.float32)})
    history = [Interaction("a great amp", 5.0, 1.0), Interaction("loose strap, poor", 4.0, 2.0),
               Interaction("nice tone overall", 5.0, 3.0)]
    plain = UserProfiler(Enc(), cache=False).profile(history)
    mapped = UserProfiler(Enc(), cache=False, transform=adapter).profile(history)
    np.testing.assert_allclose(mapped, adapter.apply(plain), rtol=1e-5, atol=1e-6)
    assert not np.allclose(mapped, plain, atol=1e-3)
    batch = UserProfiler(Enc(), cache=False, transform=adapter).profile_many([history, history[:1]])
    np.testing.assert_allclose(batch.vectors[0], mapped, rtol=1e-5, atol=1e-6)
