"""The class-sharded classifier head: what each rank holds of the identity centres, and how it learns.

* :mod:`~arcface.head.partition`: which classes each rank owns (a pure value object);
* :mod:`~arcface.head.cosine_logits`: cosine logits against (a sample of) the local centres;
* :mod:`~arcface.head.margins`: margin softmax logits (NormFace ... ArcFace, CosFace, combined, AdaFace,
  CurricularFace, sub-center) and :mod:`~arcface.head.lsoftmax`, the L-Softmax head;
* :mod:`~arcface.head.partial_fc`: the sampled Partial FC with its distributed softmax cross-entropy;
* :mod:`~arcface.head.row_optim`: SGD / AdamW that update only the sampled rows;
* :mod:`~arcface.head.shard_checkpoint`: each rank's shard file, reloaded on any world size.

The objectives (:mod:`arcface.objectives`) put this head in the loop; nothing here imports the trainer.
"""
