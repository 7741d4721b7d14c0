"""The PatchCore algorithm: patch features of a backbone (``features``, ``weights``), image geometry
(``imaging``), coreset and kNN (``coreset``, ``knn``), the memory bank (``memory``), scoring one crop
(``inference``), thresholds (``calibration``) and a fitted model (``model``).

Knows no disk layout, no MLflow and no HTTP: it imports only the root vocabulary (``bdi.errors``,
``bdi.config``, ``bdi.backbones``, ``bdi.logging``, ``bdi.refs``, ``bdi.digest``).
"""
