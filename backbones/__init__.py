"""Single-device face-recognition backbones behind one registry (``create_backbone``)."""
