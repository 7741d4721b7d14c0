"""Everything MLflow: where runs go (``tracking``), runs for fits made through the API (``api_runs``),
logging and registering a model (``registration``), the pyfunc over a model dir (``pyfunc``), copying a
registered version into a models dir (``registry_sync``), the loop that follows the registry
(``follower``), the promotion gate (``promotion``) and shadow scoring of a challenger (``shadow``).

Only :mod:`bdi.cli`, ``serving/`` and ``pipelines/`` import it.
"""
