"""BDI: PatchCore visual inspection over DINOv2 ViT-S/14 patch tokens.

The library owns every algorithm and every byte on disk; HTTP (``serving/``) and
Hydra/DVC (``pipelines/``) are thin layers over :mod:`bdi.service`.
"""

__version__ = "0.1.0"
