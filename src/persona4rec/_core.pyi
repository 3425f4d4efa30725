"""Type stubs of the native extension persona4rec._core."""

from typing import Any

import numpy as np
import numpy.typing as npt

def simd_info() -> dict[str, Any]: ...
def set_simd(name: str) -> None: ...
def quantize(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
def dot_int8(query: npt.NDArray[np.int8], rows: npt.NDArray[np.int8], simd: str = "") -> npt.NDArray[np.int32]: ...
def stream_read(array: npt.NDArray[Any]) -> int: ...

class MaxSimIndex:
    def __init__(
        self,
        codes: npt.NDArray[np.int8],
        scales: npt.NDArray[np.float32],
        offsets: npt.NDArray[np.int64],
    ) -> None: ...
    def score_candidates(
        self, query: npt.NDArray[np.float32], candidates: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
    def score_candidates_batch(
        self,
        queries: npt.NDArray[np.float32],
        candidates: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
        n_threads: int = 1,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
    def rerank_by_id(
        self,
        query: npt.NDArray[np.float32],
        candidates: Any,
        id_to_index: dict[Any, int],
        n_visible: int,
        removed: npt.NDArray[np.uint8] | None = None,
    ) -> tuple[list[Any], npt.NDArray[np.float32], npt.NDArray[np.int64], int]: ...
    def topk(
        self,
        queries: npt.NDArray[np.float32],
        k: int,
        allow: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None,
        deny: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None,
        exclude_mask: npt.NDArray[np.uint8] | npt.NDArray[np.bool_] | None = None,
        n_threads: int = 1,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
    @property
    def n_items(self) -> int: ...
    @property
    def n_personas(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def max_group(self) -> int: ...

def checksum64(buffer: Any, seed: int = 0) -> int: ...
def checksum64_v1(buffer: Any, seed: int = 0) -> int: ...
def find_int8_min(codes: npt.NDArray[np.int8]) -> int: ...
