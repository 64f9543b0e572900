"""ArcFace training with a sharded Partial FC classifier.

Modules: ``preprocess`` (the one place that defines image decoding and normalisation),
``margins``/``losses`` (the loss family), ``partition``/``partial_fc`` (the sharded classifier),
``config``, ``data``, ``optim``, ``checkpoint``, ``train`` (the loop), ``export``.
"""

__version__ = "0.1.0"
