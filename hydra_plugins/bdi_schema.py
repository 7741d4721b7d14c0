"""Registers the pipeline schema (``bdi_schema``, ``pipelines.config``) in Hydra's ConfigStore.

``conf/config.yaml`` lists ``bdi_schema`` first in its defaults. Our Hydra mains import
``pipelines.config``, which registers it; DVC's native Hydra composition (``hydra.enabled`` in
``.dvc/config``; ``dvc exp run -S ...``) composes ``conf/`` in DVC's own process instead, after loading
the Hydra plugins found under ``hydra.plugins_path`` (the repository root). Hydra imports every module
of the ``hydra_plugins`` namespace package when it scans for plugins, so importing this one is what
makes ``bdi_schema`` resolvable there too. It defines no plugin class.
"""

from pipelines.config import register_schema

register_schema()
