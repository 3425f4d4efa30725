"""persona4rec: persona-profiled item index with a SIMD int8 multi-persona max-sim core.

Public names: :class:`PersonaIndex` (build, rerank, search, explain, save/load),
:func:`simd_info` (which kernel path runs), :func:`quantize`, and the errors.
"""

from persona4rec._core import simd_info
from persona4rec._persist import IndexFormatError
from persona4rec.index import (
    ConcurrentMutationError,
    EncoderMismatchError,
    PersonaIndex,
    PersonaMatch,
    PersonaText,
    RerankResult,
    UnknownItemError,
)
from persona4rec.kernels import quantize

__version__ = "0.1.0"
__all__ = [
    "ConcurrentMutationError",
    "EncoderMismatchError",
    "IndexFormatError",
    "PersonaIndex",
    "PersonaMatch",
    "PersonaText",
    "RerankResult",
    "UnknownItemError",
    "__version__",
    "quantize",
    "simd_info",
]
