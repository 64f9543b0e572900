"""MXNet-compatible RecordIO reading/writing, dataset packing and verification packs (no torch)."""
