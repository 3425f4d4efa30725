"""Regenerate tests/encoder_fixtures/tiny_model/: a few-kilobyte ONNX "encoder" whose
token embeddings are a lookup table, so its sentence embeddings can be computed
exactly in numpy. Needs `onnx` (the export extra); the tests only read the files.

    python tests/encoder_fixtures/make_tiny_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny_model"
DIM = 8
MAX_LENGTH = 12
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = (
    "the a strings guitar strap cable sound great bad tone pizza coffee book story "
    "broke stays tune bright loud quiet fast slow cheap fresh love hate"
).split()


def vocab() -> dict[str, int]:
    return {token: i for i, token in enumerate(SPECIAL + WORDS)}


def embedding_table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((len(SPECIAL) + len(WORDS), DIM)).astype(np.float32)


def main() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    OUT.mkdir(exist_ok=True)
    (OUT / "1_Pooling").mkdir(exist_ok=True)

    tokenizer = Tokenizer(WordLevel(vocab(), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(OUT / "tokenizer.json"))

    table = numpy_helper.from_array(embedding_table(), name="embeddings")
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", "sequence_length"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch_size", "sequence_length", DIM])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embeddings", "input_ids"], ["last_hidden_state"], axis=0)],
        "tiny_lookup_encoder",
        inputs,
        [output],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="persona4rec-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, OUT / "model.onnx")

    (OUT / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": DIM, "pooling_mode_mean_tokens": True}, indent=2) + "\n"
    )
    (OUT / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LENGTH}) + "\n")


if __name__ == "__main__":
    main()
