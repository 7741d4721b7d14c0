"""BDI: PatchCore visual inspection over the patch features of a registered backbone (``bdi.backbones``).

The library owns every algorithm and every byte on disk; HTTP (``serving/``) and
Hydra/DVC (``pipelines/``) are thin layers over :mod:`bdi.service`.
"""

__version__ = "0.1.0"
