"""Interaction data: readers for log files, fetching MovieLens, per-user sequences and the
leave-one-out split.

    path = resolve_data("ml-1m", Path("data"))          # fetched once, then reused
    seqs = build_sequences(read_interactions(path))     # each user's items in time order
    split = leave_one_out(seqs)                         # train / validation / test
"""

from .fetch import DATASETS, DatasetSpec, dataset_path, fetch_dataset, resolve_data
from .readers import DataError, Interactions, MissingDataError, read_interactions
from .sequences import PAD, LeaveOneOut, SequenceData, build_sequences, leave_one_out

__all__ = [
    "DATASETS", "DataError", "DatasetSpec", "Interactions", "MissingDataError", "LeaveOneOut", "PAD", "SequenceData",
    "build_sequences", "dataset_path", "fetch_dataset", "leave_one_out", "read_interactions",
    "resolve_data",
]
