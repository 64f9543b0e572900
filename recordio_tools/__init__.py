"""MXNet-compatible RecordIO reading/writing, dataset packing and verification packs (no torch).

Modules: :mod:`.codec` (framing, ``IRHeader``, image helpers), :mod:`.reader` (indexed, memory-mapped
reader), :mod:`.writer` (atomic writers), :mod:`.dataset` (``open_dataset``: one file or shards),
:mod:`.shards` (manifest), :mod:`.verification_bin` (``.bin`` packs), :mod:`.cli` (``pack_rec``).
"""

from .codec import MAGIC, IRHeader, pack, pack_img, unpack, unpack_img
from .dataset import FaceRecordDataset, open_dataset
from .errors import RecordIOError
from .reader import IndexedRecordReader
from .writer import FaceDatasetWriter, IndexedRecordWriter

__all__ = ["MAGIC", "FaceDatasetWriter", "FaceRecordDataset", "IRHeader", "IndexedRecordReader",
           "IndexedRecordWriter", "RecordIOError", "open_dataset", "pack", "pack_img", "unpack", "unpack_img"]
