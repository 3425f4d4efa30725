"""Named datasets: where their files come from and how to load them.

A dataset directory is found, in order, at:

1. the ``data_dir`` argument (``--data-dir`` on the command line);
2. ``$PERSONA4REC_DATA_DIR/<name>``;
3. ``$PERSONA4REC_SHARED/data/<name>`` (the project's shared data folder, used by CI);
4. the per-user cache (:func:`cache_dir`: ``$PERSONA4REC_CACHE_DIR``,
   ``$XDG_CACHE_HOME/persona4rec`` or ``~/.cache/persona4rec``), under ``datasets/<name>``;

and, when none of them has the files and ``download=True``, the files are fetched from
their public source into the cache and checked against their SHA-256 before use.
Add a category by adding a :class:`DatasetSpec` to ``DATASETS``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from persona4rec.data.loaders import load_items, load_reviews
from persona4rec.data.tables import ItemTable, ReviewTable


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset: its name in the dataset directory and where to fetch it."""

    name: str
    sha256: str
    url: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the review file, an optional item file and their formats."""

    name: str
    reviews: DatasetFile
    review_format: str
    items: DatasetFile | None = None
    item_format: str = "items-csv"
    description: str = ""


_AMAZON_2014_BASE = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"

DATASETS: dict[str, DatasetSpec] = {
    "amazon-mi-5core": DatasetSpec(
        name="amazon-mi-5core",
        description="Amazon 2014 Musical Instruments 5-core (McAuley et al.): 10,261 reviews, 1,429 users, 900 items",
        reviews=DatasetFile(
            name="reviews_Musical_Instruments_5.json.gz",
            sha256="7ed1a27e5c881dd30ed1b945c2d76ce43eff21c9cc04977d2ff7e77be3859e7f",
            url=_AMAZON_2014_BASE + "reviews_Musical_Instruments_5.json.gz",
        ),
        review_format="amazon2014",
        # The item titles file is derived from the 2014 metadata dump and has no
        # public URL of its own; without it items fall back to empty titles.
        items=DatasetFile(
            name="items.csv",
            sha256="3937ea3db01bd364f2b7cb4e30c82e81230dd6f58d99206fe1dde46488c22e72",
        ),
        item_format="items-csv",
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """No directory holds the dataset and it could not be downloaded."""


def cache_dir() -> Path:
    """The per-user cache root (``$PERSONA4REC_CACHE_DIR``, ``$XDG_CACHE_HOME/persona4rec``
    or ``~/.cache/persona4rec``), shared with the encoder and the interaction cache."""
    from persona4rec.paths import default_cache_dir

    return default_cache_dir()


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("PERSONA4REC_DATA_DIR"):
        dirs.append(Path(os.environ["PERSONA4REC_DATA_DIR"]) / name)
    if os.environ.get("PERSONA4REC_SHARED"):
        dirs.append(Path(os.environ["PERSONA4REC_SHARED"]) / "data" / name)
    dirs.append(cache_dir() / "datasets" / name)
    return dirs


def download_file(url: str, destination: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``destination`` atomically, refusing a file whose SHA-256 differs."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False, suffix=".part") as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, tmp)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    actual = sha256_of(tmp_path)
    if actual != sha256:
        tmp_path.unlink(missing_ok=True)
        raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; "
                         "the source changed or the download was corrupted")
    os.replace(tmp_path, destination)
    return destination


def resolve_dataset_dir(name: str, data_dir: str | os.PathLike[str] | None = None,
                        download: bool = True) -> Path:
    """The directory holding the dataset's review file (downloading it if allowed)."""
    spec = get_spec(name)
    searched = _candidate_dirs(name, data_dir)
    if data_dir is not None and not (Path(data_dir) / spec.reviews.name).is_file():
        raise DatasetNotFoundError(f"--data-dir {data_dir} has no {spec.reviews.name}; "
                                   f"point it at the folder that holds the {name} files")
    for directory in searched:
        if (directory / spec.reviews.name).is_file():
            return directory
    target = searched[-1]
    if download and spec.reviews.url:
        download_file(spec.reviews.url, target / spec.reviews.name, spec.reviews.sha256)
        if spec.items is not None and spec.items.url:
            download_file(spec.items.url, target / spec.items.name, spec.items.sha256)
        return target
    tried = ", ".join(str(d) for d in searched)
    raise DatasetNotFoundError(f"dataset {name!r} not found (looked in: {tried}); pass --data-dir, "
                               "set PERSONA4REC_SHARED or PERSONA4REC_DATA_DIR, or allow the download")


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
                 verify: bool = False, lenient: bool = False) -> tuple[ReviewTable, ItemTable | None]:
    """Load a registered dataset: its reviews and, when its file is present, its items.

    ``verify=True`` checks local files against the registry's SHA-256 as well
    (downloads are always checked).
    """
    spec = get_spec(name)
    directory = resolve_dataset_dir(name, data_dir, download=download)
    files = [spec.reviews] + ([spec.items] if spec.items is not None else [])
    if verify:
        for entry in files:
            path = directory / entry.name
            if path.is_file() and sha256_of(path) != entry.sha256:
                raise ValueError(f"{path}: sha256 does not match the registry entry for {name}")
    reviews = load_reviews(directory / spec.reviews.name, spec.review_format, lenient=lenient)
    items = None
    if spec.items is not None and (directory / spec.items.name).is_file():
        items = load_items(directory / spec.items.name, spec.item_format, lenient=lenient)
    return reviews, items
