"""Hydra entry points that DVC stages call: ``python -m pipelines.<stage> [overrides]``.

Stages: ingest → fit_ok → calibrate → evaluate → register (see dvc.yaml). Each module holds a pure
``run_<stage>`` function and a thin ``main`` that composes the config (``pipelines.config``), calls it,
writes the outputs named by ``paths.*`` and logs the run to MLflow. Algorithms live in ``bdi``.
"""
