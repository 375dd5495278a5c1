"""Data sources, the dataset artifact and splits."""
from __future__ import annotations

from kdflow.data.dataset import SPLITS, Dataset, load_dataset, save_dataset
from kdflow.data.sources import DEFAULT_SOURCE, SOURCES, RawSource, load_source
from kdflow.data.split import stratified_split

__all__ = [
    "DEFAULT_SOURCE",
    "SOURCES",
    "SPLITS",
    "Dataset",
    "RawSource",
    "load_dataset",
    "load_source",
    "save_dataset",
    "stratified_split",
]
