"""Every byte on disk: atomic writes (``fsio``), the model store (``store``), reading a stored model for
scoring (``loading``), the OK/NG sample folders (``datasets``), the per-model fit lock (``model_lock``)
and a model's lineage (``lineage``).

May import :mod:`bdi.patchcore` types; knows no MLflow and no HTTP.
"""
