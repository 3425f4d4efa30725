"""Review datasets: loaders, the dataset registry, cleaning and the leave-one-out and temporal splits."""

from persona4rec.data.loaders import (
    ITEM_FORMATS,
    REVIEW_FORMATS,
    ItemColumns,
    ReviewColumns,
    iter_records,
    load_items,
    load_reviews,
    open_text,
)
from persona4rec.data.registry import DATASETS, DatasetSpec, cache_dir, load_dataset, resolve_dataset_dir
from persona4rec.data.split import (
    LeaveOneOutSplit,
    TemporalSplit,
    dedupe_keep_latest,
    k_core,
    leave_one_out_split,
    temporal_split,
)
from persona4rec.data.tables import DataFormatError, ItemTable, ReviewTable

__all__ = [
    "DATASETS", "DataFormatError", "DatasetSpec", "ITEM_FORMATS", "ItemColumns", "ItemTable",
    "LeaveOneOutSplit", "REVIEW_FORMATS", "ReviewColumns", "ReviewTable", "TemporalSplit", "cache_dir",
    "dedupe_keep_latest", "iter_records", "k_core", "leave_one_out_split", "load_dataset",
    "load_items", "load_reviews", "open_text", "resolve_dataset_dir", "temporal_split",
]
