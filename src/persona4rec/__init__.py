"""persona4rec: persona-profiled item index with a SIMD int8 multi-persona max-sim core.

Public names: :class:`PersonaIndex` (build, rerank, search, explain, save/load),
:class:`Encoder` / :func:`load_default_encoder` (ONNX Runtime text encoder),
:class:`UserProfiler` (recency-weighted user profiles), :class:`Recommender` (history in,
explained top-k out: profiler + index + optional first stage) and its :class:`Recommendation`,
:func:`simd_info` (which kernel
path runs), :func:`quantize`, and the errors.
"""

from persona4rec._core import simd_info
from persona4rec._persist import IndexFormatError
from persona4rec.default_model import load_default_encoder
from persona4rec.encoder import EncoderMismatchError, Encoder, ModelNotFoundError
from persona4rec.index import (
    ConcurrentMutationError,
    PersonaIndex,
    PersonaMatch,
    PersonaText,
    RerankResult,
    SearchResult,
    UnknownItemError,
)
from persona4rec.kernels import quantize
from persona4rec.profile import EmptyHistoryError, UserProfiler
from persona4rec.recommender import Recommendation, Recommender
from persona4rec.sharded import ShardedPersonaIndex

__version__ = "0.1.0"
__all__ = [
    "ConcurrentMutationError",
    "EmptyHistoryError",
    "Encoder",
    "EncoderMismatchError",
    "ModelNotFoundError",
    "UserProfiler",
    "load_default_encoder",
    "IndexFormatError",
    "PersonaIndex",
    "PersonaMatch",
    "PersonaText",
    "Recommendation",
    "Recommender",
    "RerankResult",
    "SearchResult",
    "ShardedPersonaIndex",
    "UnknownItemError",
    "__version__",
    "quantize",
    "simd_info",
]
