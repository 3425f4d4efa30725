"""atheris target: any bytes given to PersonaIndex.load raise IndexFormatError or load.

Run it directly for a longer campaign (a corpus directory is optional)::

    python tests/fuzz/fuzz_index_load.py -runs=1000000 [CORPUS_DIR]

The seeds are small valid indexes (string and integer ids, texts, removed items, a
graph), so mutations start inside the format instead of at its magic bytes. Anything
other than IndexFormatError escaping, a crash or a hang is a finding. A loaded index is
also queried, so a file that loads must serve.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports(include=["persona4rec"]):
    from persona4rec import IndexFormatError, PersonaIndex


def seed_files(directory: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for kind, ann in (("str", False), ("int", True)):
        v = rng.standard_normal((9, 4)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = [f"i{j}" for j in range(4)] if kind == "str" else [7, 8, 9, 10]
        index = PersonaIndex.build(ids, v, [0, 2, 5, 6, 9], personas=[f"p{j}" for j in range(9)] if kind == "str" else None)
        index.remove_items([ids[1]])
        if ann:
            index.build_ann(M=2, ef_construction=4, ef=4)
        path = directory / f"seed_{kind}.p4r"
        index.save(path)
        out.append(path)
    return out


_SCRATCH = Path(tempfile.mkdtemp(prefix="p4r-fuzz-"))
_TARGET = _SCRATCH / "input.p4r"
_QUERY = np.full(4, 0.5, dtype=np.float32)


def test_one_input(data: bytes) -> None:
    _TARGET.write_bytes(data)
    fdp = atheris.FuzzedDataProvider(data[-2:] if len(data) >= 2 else b"\0\0")
    mmap, verify = fdp.ConsumeBool(), fdp.ConsumeBool()
    try:
        index = PersonaIndex.load(_TARGET, mmap=mmap, verify=verify)
    except IndexFormatError:
        return
    if index.dim == 4:
        index.search(_QUERY, k=3)
        if index._snap.ann is not None:
            index.search_approx(_QUERY, k=3)


def main(argv: list[str]) -> None:
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:
        seeds = _SCRATCH / "seeds"
        seeds.mkdir()
        seed_files(seeds)
        argv = argv + [str(seeds)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
