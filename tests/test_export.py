"""export-encoder: argument and source checks always; a real export of a tiny random BERT with torch."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from persona4rec.cli import main
from persona4rec.export import LowInt8AgreementError, export_encoder

TINY_TOKENIZER = Path(__file__).parent / "encoder_fixtures" / "tiny_model" / "tokenizer.json"


def fake_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_text("{}")
    return src


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        export_encoder(tmp_path / "nope", tmp_path / "out")


def test_incomplete_source_lists_missing_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or pytorch_model\.bin, tokenizer\.json"):
        export_encoder(src, tmp_path / "out")


def test_existing_output_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_encoder(fake_source(tmp_path), tmp_path / "out")


def test_missing_export_extra_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)
    with pytest.raises(ImportError, match=r"torch==2\.13\.0.*persona4rec\[export\]"):
        export_encoder(fake_source(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_argument_errors(capsys) -> None:
    with pytest.raises(SystemExit, match="give SRC and OUT"):
        main(["export-encoder", "only-src"])
    with pytest.raises(SystemExit, match="not both"):
        main(["export-encoder", "--default", "a", "b"])


def test_cli_reports_bad_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="export-encoder: export source .* is not a directory"):
        main(["export-encoder", str(tmp_path / "nope"), str(tmp_path / "out")])


# ---------------------------------------------------------------- real export (torch)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("optimum.exporters.onnx")
    vocab_size = len(json.loads(TINY_TOKENIZER.read_text())["model"]["vocab"])
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    src = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(src)
    shutil.copyfile(TINY_TOKENIZER, src / "tokenizer.json")
    return src


def _torch_mean_pooled(src: Path, texts: list[str]) -> np.ndarray:
    import torch
    import transformers
    from tokenizers import Tokenizer

    model = transformers.BertModel.from_pretrained(src).eval()
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text).ids])
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            v = hidden.mean(0).numpy()
            rows.append(v / np.linalg.norm(v))
    return np.vstack(rows)


def test_source_without_pooling_config_needs_pooling(tmp_path: Path) -> None:
    src = fake_source(tmp_path)
    (src / "1_Pooling" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="--pooling"):
        export_encoder(src, tmp_path / "out", int8=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name], "staging directory left behind"


@pytest.mark.torch
def test_export_matches_torch_and_writes_manifest(tiny_bert: Path, tmp_path: Path) -> None:
    from persona4rec.encoder import Encoder, read_manifest

    out = export_encoder(
        tiny_bert, tmp_path / "out", pooling="mean", max_length=32, name="tiny-bert", allow_low_int8_agreement=True
    )
    manifest = read_manifest(out)
    assert manifest["name"] == "tiny-bert" and manifest["pooling"] == "mean" and manifest["dim"] == 32
    assert manifest["max_length"] == 32 and manifest["normalize"] is True
    assert manifest["source"]["path"] == str(tiny_bert.resolve())
    assert set(manifest["files"]) == {"fp32", "int8", "tokenizer"}
    assert 0.0 < manifest["int8_agreement"]["mean_cosine"] <= 1.0

    texts = ["the guitar strings sound great", "pizza", "cheap strap broke fast"]
    fp32 = Encoder(out)
    assert fp32.identity == {
        "model": "tiny-bert", "dim": 32, "pooling": "mean", "max_length": 32,
        "fingerprint": manifest["files"]["fp32"]["fingerprint"],
    }
    cosines = np.sum(fp32.encode(texts) * _torch_mean_pooled(tiny_bert, texts), axis=1)
    assert cosines.min() >= 0.9999
    assert Encoder(out, quantized=True).identity["fingerprint"] == manifest["files"]["int8"]["fingerprint"]


@pytest.mark.torch
def test_low_int8_agreement_is_refused_and_writes_nothing(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(LowInt8AgreementError, match="--no-int8"):
        export_encoder(tiny_bert, tmp_path / "out", pooling="mean", min_int8_cosine=1.0)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name], "staging directory left behind"
    with pytest.warns(RuntimeWarning, match="below 1.0"):
        export_encoder(tiny_bert, tmp_path / "out", pooling="mean", min_int8_cosine=1.0, allow_low_int8_agreement=True)
    assert (tmp_path / "out" / "model_int8.onnx").is_file()


@pytest.mark.torch
def test_cli_export_without_int8(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli_out"
    assert main(["export-encoder", str(tiny_bert), str(out), "--pooling", "cls", "--no-int8"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "model.onnx").is_file() and not (out / "model_int8.onnx").exists()
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    with pytest.raises(SystemExit, match="already exists"):
        main(["export-encoder", str(tiny_bert), str(out), "--pooling", "cls", "--no-int8"])
    assert main(["export-encoder", str(tiny_bert), str(out), "--pooling", "mean", "--no-int8", "--overwrite"]) == 0
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
