"""Loaders, gzip handling, error messages and the dataset registry."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from persona4rec.data import (
    DataFormatError,
    ItemColumns,
    ReviewColumns,
    load_dataset,
    load_items,
    load_reviews,
    resolve_dataset_dir,
)
from persona4rec.data import registry


def write_jsonl(path: Path, records: list[object], gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


AMAZON_2014_ROWS = [
    {"reviewerID": "U1", "asin": "I1", "overall": 5.0, "unixReviewTime": 1000, "summary": "Great",
     "reviewText": "Loved it.", "helpful": [0, 0]},
    {"reviewerID": "U2", "asin": "I1", "overall": 2.0, "unixReviewTime": 2000, "summary": "Meh"},
]


def test_amazon_2014_gzip_typed_columns_and_raw_record(tmp_path: Path) -> None:
    # The name has no .gz: gzip is detected from the content.
    path = write_jsonl(tmp_path / "reviews.json", AMAZON_2014_ROWS, gz=True)
    table = load_reviews(path, "amazon2014")
    assert list(table.user) == ["U1", "U2"]
    assert list(table.item) == ["I1", "I1"]
    assert table.rating.dtype == np.float32 and list(table.rating) == [5.0, 2.0]
    assert table.timestamp.dtype == np.float64 and list(table.timestamp) == [1000.0, 2000.0]
    assert list(table.title) == ["Great", "Meh"]
    # reviewText is optional in real Amazon dumps; a missing one reads as empty.
    assert list(table.text) == ["Loved it.", ""]
    assert table.raw[0]["helpful"] == [0, 0]


def test_amazon_2023_milliseconds_and_yelp_dates(tmp_path: Path) -> None:
    a23 = write_jsonl(tmp_path / "a23.jsonl", [
        {"user_id": "u", "parent_asin": "p", "rating": 4, "timestamp": 1_600_000_000_500,
         "title": "t", "text": "x"}])
    table = load_reviews(a23, "amazon2023")
    assert table.timestamp[0] == pytest.approx(1_600_000_000.5)
    assert table.item[0] == "p"
    yelp = write_jsonl(tmp_path / "yelp.json", [
        {"user_id": "u", "business_id": "b", "stars": 3, "date": "2016-03-09 00:00:00", "text": "ok"}])
    table = load_reviews(yelp, "yelp")
    assert table.timestamp[0] == pytest.approx(1457481600.0)
    assert table.title[0] == ""


def test_generic_csv_with_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("who,what,when,stars,body\nalice,book,5,4.5,nice\nbob,pen,7,1,bad\n")
    mapping = ReviewColumns(user="who", item="what", timestamp="when", rating="stars", text="body")
    table = load_reviews(path, mapping)
    assert list(table.user) == ["alice", "bob"]
    assert list(table.rating) == [4.5, 1.0]
    assert list(table.text) == ["nice", "bad"]


def test_missing_required_field_names_file_line_and_field(tmp_path: Path) -> None:
    rows = [AMAZON_2014_ROWS[0], {"reviewerID": "U3", "overall": 1.0, "unixReviewTime": 5}]
    path = write_jsonl(tmp_path / "bad.json", rows)
    with pytest.raises(DataFormatError) as info:
        load_reviews(path, "amazon2014")
    message = str(info.value)
    assert "bad.json" in message and "line 2" in message and "'asin'" in message and "lenient" in message


def test_unreadable_value_names_the_field(tmp_path: Path) -> None:
    rows = [{**AMAZON_2014_ROWS[0], "overall": "five"}]
    path = write_jsonl(tmp_path / "bad.json", rows)
    with pytest.raises(DataFormatError, match=r"line 1: field 'overall'"):
        load_reviews(path, "amazon2014")


def test_malformed_line_is_an_error_unless_lenient(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.json.gz", [AMAZON_2014_ROWS[0], "{not json", AMAZON_2014_ROWS[1],
                                                {"reviewerID": "U9"}], gz=True)
    with pytest.raises(DataFormatError, match=r"r.json.gz: line 2: malformed line"):
        load_reviews(path, "amazon2014")
    with pytest.warns(UserWarning, match="skipped 2 malformed"):
        table = load_reviews(path, "amazon2014", lenient=True)
    assert len(table) == 2 and table.skipped_lines == 2


def test_item_loaders_csv_amazon_2014_literal_and_yelp(tmp_path: Path) -> None:
    csv_path = tmp_path / "items.csv"
    csv_path.write_text('Product ID,Description,price,Category\nI1,"Guitar, red",9.5,Guitars\n')
    items = load_items(csv_path, "items-csv")
    assert items.title_of("I1") == "Guitar, red" and items.category_of("I1") == "Guitars"
    assert items.title_of("nope", "?") == "?"
    # Amazon 2014 metadata is Python-literal, not JSON.
    meta = tmp_path / "meta.json"
    meta.write_text("{'asin': 'I2', 'title': 'Strap', 'categories': [['Music', 'Straps']]}\n")
    items = load_items(meta, "amazon-meta-2014")
    assert items.title_of("I2") == "Strap" and items.category_of("I2") == "Music | Straps"
    yelp = write_jsonl(tmp_path / "biz.json", [{"business_id": "b", "name": "Cafe", "categories": "Food"}])
    assert load_items(yelp, "yelp-business").title_of("b") == "Cafe"
    with pytest.raises(DataFormatError, match=r"line 1: field 'business_id'"):
        load_items(write_jsonl(tmp_path / "b2.json", [{"name": "x"}]), "yelp-business")
    custom = ItemColumns(item="id", title="name")
    assert load_items(write_jsonl(tmp_path / "c.json", [{"id": 1, "name": "n"}]), custom).title_of("1") == "n"


def _fake_spec(tmp_path: Path, url: str | None, sha: str) -> registry.DatasetSpec:
    return registry.DatasetSpec(name="tiny", reviews=registry.DatasetFile("r.json.gz", sha, url),
                                review_format="amazon2014")


def test_registry_download_checks_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_jsonl(tmp_path / "src.json.gz", AMAZON_2014_ROWS, gz=True)
    good = registry.sha256_of(source)
    monkeypatch.setenv("PERSONA4REC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PERSONA4REC_SHARED", raising=False)
    monkeypatch.delenv("PERSONA4REC_DATA_DIR", raising=False)
    monkeypatch.setitem(registry.DATASETS, "tiny", _fake_spec(tmp_path, source.as_uri(), "0" * 64))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_dataset("tiny")
    assert not (tmp_path / "cache" / "datasets" / "tiny" / "r.json.gz").exists()
    monkeypatch.setitem(registry.DATASETS, "tiny", _fake_spec(tmp_path, source.as_uri(), good))
    reviews, items = load_dataset("tiny")
    assert len(reviews) == 2 and items is None
    assert (tmp_path / "cache" / "datasets" / "tiny" / "r.json.gz").is_file()


def test_registry_lookup_order_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONA4REC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.DATASETS, "tiny", _fake_spec(tmp_path, None, "0" * 64))
    shared = tmp_path / "shared"
    write_jsonl((shared / "data" / "tiny").mkdir(parents=True) or shared / "data" / "tiny" / "r.json.gz",
                AMAZON_2014_ROWS, gz=True)
    monkeypatch.setenv("PERSONA4REC_SHARED", str(shared))
    monkeypatch.delenv("PERSONA4REC_DATA_DIR", raising=False)
    assert resolve_dataset_dir("tiny") == shared / "data" / "tiny"
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        resolve_dataset_dir("tiny", data_dir=tmp_path / "empty")
    monkeypatch.delenv("PERSONA4REC_SHARED")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_dataset_dir("tiny", download=True)
    with pytest.raises(KeyError, match="known"):
        resolve_dataset_dir("no-such-dataset")


@pytest.fixture
def shared_dir() -> Path:
    value = os.environ.get("PERSONA4REC_SHARED")
    if not value or not (Path(value) / "data" / "amazon-mi-5core").is_dir():
        pytest.skip("PERSONA4REC_SHARED is not set or has no data/amazon-mi-5core")
    return Path(value)


def test_real_mi_5core_loads_with_registry_checksums(shared_dir: Path) -> None:
    reviews, items = load_dataset("amazon-mi-5core", download=False, verify=True)
    assert len(reviews) == 10_261
    assert len(set(reviews.user)) == 1_429 and len(set(reviews.item)) == 900
    assert items is not None and len(items) == 900
    assert all(items.title_of(i) for i in set(reviews.item))
    assert (reviews.text == "").sum() == 7
