"""ArcFace training with a sharded Partial FC classifier.

Layout (the folders follow the data through a training step)::

    data/        RecordIO dataset, augmentations, resumable samplers, the loader
    head/        the class-sharded classifier: partition, cosine logits, margins, Partial FC,
                 row optimisers, shard checkpoints
    objectives/  the loss the loop trains, one interface chosen by ``loss.kind`` (margin softmax
                 through the head, metric losses, center loss)
    deploy/      ONNX export and embedding extraction
    interop/     InsightFace arcface_torch configs and runs

and, at this level, the loop: ``config`` (typed recipe), ``train`` (the loop), ``launch``
(``./run.sh train``), ``optim`` (backbone optimiser, LR schedules), ``train_state`` and ``checkpoint``
(checkpoint files), ``logging_utils``, ``distributed`` (rank helpers and collectives), ``preprocess``
(the one definition of image decoding and normalisation, shared with ``eval/``) and ``demo``.
"""

__version__ = "0.1.0"
