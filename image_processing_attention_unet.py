"""Image processor for the Attention U-Net: any image to a normalised RGB tensor, logits back to a mask."""

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling


def to_rgb_uint8(image: "PIL.Image.Image | np.ndarray | torch.Tensor") -> np.ndarray:
    """Converts an image of any common mode or dtype to a `(H, W, 3)` uint8 array.

    Handles PIL images in any mode (EXIF orientation applied; grayscale, palette, RGBA, CMYK, 16-bit and float), and
    arrays or tensors shaped `(H, W)`, `(H, W, C)` or `(C, H, W)` with 1, 3 or 4 channels. Integer arrays are scaled by
    their dtype's range (a 16-bit frame's 65535 is white); float arrays are taken as [0, 1] if their maximum is at most
    1, else as [0, 255].
    """
    if isinstance(image, PIL.Image.Image):
        image = PIL.ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image)
            if image.mode.startswith("I;16"):
                array = array.astype(np.uint16)
            elif image.mode == "I":
                # 32-bit integer mode is how PIL opens most 16-bit PNGs.
                array = np.clip(array, 0, 65535).astype(np.uint16)
            return to_rgb_uint8(array)
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)) or 0 in image.shape:
        raise ValueError(
            f"Expected an image shaped (H, W), (H, W, C) or (C, H, W) with C in (1, 3, 4), got {image.shape}."
        )
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.integer):
        if image.dtype != np.uint8:
            maximum = np.iinfo(image.dtype).max
            image = (np.clip(image.astype(np.float64), 0, maximum) / maximum * 255.0).round().astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float64)
        if not np.isfinite(image).all():
            raise ValueError("The image holds NaN or infinite values.")
        scale = 255.0 if image.max(initial=0.0) <= 1.0 else 1.0
        image = np.clip(image * scale, 0, 255).round().astype(np.uint8)
    else:
        raise ValueError(f"Unsupported image dtype {image.dtype}.")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


class AttentionUNetImageProcessor(PilBackend):
    r"""
    Prepares images for [`AttentionUNetForSemanticSegmentation`] and turns its logits into masks. Needs no
    torchvision.

    Preprocessing converts every image to RGB (see `to_rgb_uint8`), resizes it to `size` (default 256x256), rescales
    to [0, 1] and normalises with the encoder's ImageNet mean and std.
    `post_process_semantic_segmentation` resizes the logits to each image's original size, then thresholds the
    sigmoid at `threshold` (default 0.5), giving one `(H, W)` mask of 0 (background) and 1 (polyp) per image.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 256, "width": 256}
    default_to_square = True
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    threshold = 0.5

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        # transformers rejects 2-D arrays and tensors before `process_image` sees them: give an `(H, W)` frame a
        # trailing channel axis so grayscale arrays are taken like every other layout.
        def with_channel_axis(image):
            return image[..., None] if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 2 else image

        if isinstance(images, (list, tuple)):
            images = [with_channel_axis(image) for image in images]
        else:
            images = with_channel_axis(images)
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        """One image of any supported kind -> `(3, H, W)` uint8."""
        return np.moveaxis(to_rgb_uint8(image), -1, 0)

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | None = None, threshold: float | None = None
    ) -> list[torch.Tensor]:
        """
        Args:
            outputs: the model's output, whose `logits` are `(B, C, h, w)`.
            target_sizes: one `(height, width)` per image, usually its original size. `None` keeps the logits' size.
            threshold: foreground probability cut-off for one-channel logits; defaults to `self.threshold`.

        Returns:
            One `(height, width)` int64 mask per image: 0 is background, 1 is polyp (with several channels, the
            argmax).
        """
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        threshold = self.threshold if threshold is None else threshold
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} logits.")
        masks = []
        for index, image_logits in enumerate(logits.float()):
            if target_sizes is not None:
                size = tuple(int(side) for side in target_sizes[index])
                image_logits = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False)[0]
            if image_logits.shape[0] == 1:
                masks.append((image_logits[0].sigmoid() > threshold).long())
            else:
                masks.append(image_logits.argmax(dim=0))
        return masks


__all__ = ["AttentionUNetImageProcessor", "to_rgb_uint8"]
