"""Drawing results: masks over frames, probabilities and gate maps as heat maps."""


import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
import torch.nn.functional as F

OVERLAY_COLOR = np.array([0, 255, 0], dtype=np.float32)
OVERLAY_ALPHA = 0.35
HEATMAP_COLORMAP = "jet"


def overlay_mask(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`(H, W, 3)` uint8 frame and `(H, W)` bool mask -> the frame with the mask filled translucently and outlined (a
    line about 0.5% of the image's side)."""
    overlay = frame.astype(np.float32)
    overlay[mask] = (1.0 - OVERLAY_ALPHA) * overlay[mask] + OVERLAY_ALPHA * OVERLAY_COLOR
    thickness = max(1, round(min(mask.shape) / 200))
    eroded = PIL.Image.fromarray(mask.astype(np.uint8) * 255).filter(PIL.ImageFilter.MinFilter(2 * thickness + 1))
    outline = mask & ~(np.asarray(eroded) > 0)
    overlay[outline] = OVERLAY_COLOR
    return overlay.round().astype(np.uint8)


def heat_map(coefficients: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A `(1, h, w)` map in [0, 1] (a gate's coefficients, or the polyp probability), resized to `size`, as an
    `(H, W, 3)` uint8 heat map on a fixed [0, 1] scale."""
    import matplotlib

    coefficients = torch.as_tensor(coefficients)[None].float()
    resized = F.interpolate(coefficients, size=size, mode="bilinear", align_corners=False)[0, 0]
    colors = matplotlib.colormaps[HEATMAP_COLORMAP](resized.clamp(0, 1).numpy())[..., :3]
    return (colors * 255).round().astype(np.uint8)

