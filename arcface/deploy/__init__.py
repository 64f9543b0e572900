"""What leaves the trainer: ONNX export with parity checks (:mod:`~arcface.deploy.export`, ``arcface-export``)
and embeddings of face images (:mod:`~arcface.deploy.embed`, ``arcface-embed``)."""
