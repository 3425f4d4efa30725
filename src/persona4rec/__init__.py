"""persona4rec: persona-profiled item index with a SIMD int8 multi-persona max-sim core."""

from persona4rec._core import simd_info

__version__ = "0.1.0"
__all__ = ["simd_info", "__version__"]
