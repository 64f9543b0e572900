"""Evaluation: verification packs, IJB-B/C, MegaFace, embedders and reports."""
