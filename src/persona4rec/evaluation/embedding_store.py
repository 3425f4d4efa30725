"""A disk cache of text embeddings keyed by (encoder fingerprint, text hash), so reruns skip encoding."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

STORE_VERSION = 1


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingStore:
    """Embeddings of texts already encoded by one encoder, persisted in one ``.npz`` file.

    ``encoder_id`` must change whenever the encoder would give different vectors (the
    ONNX encoder's fingerprint does); each encoder gets its own file.
    """

    def __init__(self, directory: str | os.PathLike[str], encoder_id: str) -> None:
        self.path = Path(directory) / f"embeddings-{hashlib.sha1(encoder_id.encode()).hexdigest()[:16]}.npz"
        self.encoder_id = encoder_id
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("version") == STORE_VERSION and meta.get("encoder_id") == encoder_id:
                    self._vectors = data["vectors"]
                    self._rows = {k: i for i, k in enumerate(data["keys"].tolist())}

    def __len__(self) -> int:
        return len(self._rows)

    def encode(self, texts: Sequence[str], encode: Callable[[list[str]], np.ndarray],
               progress: Callable[[str], Any] | None = None, chunk: int = 512) -> np.ndarray:
        """Vectors for ``texts`` (input order), encoding only the texts not stored yet.

        New vectors are saved after every ``chunk`` texts, so an interrupted run resumes.
        """
        keys = [text_key(t) for t in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts):
            if key not in self._rows and key not in missing:
                missing[key] = text
        if missing:
            todo = list(missing.items())
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                vectors = np.asarray(encode([t for _, t in part]), dtype=np.float32)
                self._add([k for k, _ in part], vectors)
                if progress is not None:
                    progress(f"encoded {min(start + chunk, len(todo))}/{len(todo)} new texts")
        rows = np.fromiter((self._rows[k] for k in keys), dtype=np.int64, count=len(keys))
        return self._vectors[rows] if len(rows) else np.zeros((0, self._vectors.shape[1]), np.float32)

    def _add(self, keys: list[str], vectors: np.ndarray) -> None:
        base = len(self._rows)
        self._vectors = vectors.copy() if base == 0 else np.concatenate([self._vectors, vectors])
        for i, key in enumerate(keys):
            self._rows[key] = base + i
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        ordered = sorted(self._rows, key=self._rows.__getitem__)
        np.savez(tmp, vectors=self._vectors, keys=np.array(ordered),
                 meta=np.array(json.dumps({"version": STORE_VERSION, "encoder_id": self.encoder_id})))
        os.replace(tmp, self.path)
