"""Working with InsightFace ``arcface_torch``: its config files translated to recipes
(:mod:`~arcface.interop.insightface_config`) and its training runs continued here
(:mod:`~arcface.interop.insightface_resume`, through the importer registry of
:mod:`~arcface.interop.run_import`). Its backbones' weights load through :mod:`backbones.insightface`."""
