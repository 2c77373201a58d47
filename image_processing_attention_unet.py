"""Image processor for the Attention U-Net: any image (and mask) to RGB tensors in [0, 1], logits back to a mask."""

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.pipelines import ImageSegmentationPipeline

# Mask pixels above this value are foreground where a mask has values above 1 (0/255 PNGs; Kvasir-SEG's JPEG masks,
# whose background is noise in 0..8 and foreground in 247..255).
MASK_THRESHOLD = 127


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


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """`(H, W)` or `(H, W, C)` mask in any common encoding -> `(H, W)` bool. 0/1 masks are taken as they are; anything
    with larger values (0/255 PNGs, JPEG masks with compression noise, RGB masks) is thresholded at 127."""
    if mask.ndim == 3:
        mask = mask.max(axis=-1)
    return mask > 0 if mask.max(initial=0) <= 1 else mask > MASK_THRESHOLD


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(H, W)` bool mask -> `(height, width)` bool, resampled as the image is (bilinear) and cut at half, so that a
    polyp's outline moves with the frame's rather than snapping to nearest-neighbour steps."""
    height, width = size
    resized = PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), PIL.Image.Resampling.BILINEAR)
    return np.asarray(resized) > MASK_THRESHOLD


class AttentionUNetImageProcessor(BaseImageProcessor):
    r"""
    Prepares images (and, for training, their masks) for [`AttentionUNetForSemanticSegmentation`] and turns its logits
    into masks. Needs no torchvision.

    Preprocessing converts every image to RGB (see `to_rgb_uint8`), resizes it to `size` (default 256x256, bilinear)
    and rescales to [0, 1]; the model normalises them itself (its config's `image_mean` and `image_std`). With
    `do_normalize=True` it also normalises with `image_mean` and `image_std`, for models whose config has no
    statistics (saved before the model normalised its inputs). `segmentation_maps`, when given, are
    binarised (see `binarize_mask`), resized the same way and returned as `labels` `(B, height, width)` int64, ready
    for the model's loss and for `transformers.Trainer`.
    `post_process_semantic_segmentation` resizes the logits to each image's original size, then thresholds the
    sigmoid, giving one `(H, W)` mask of 0 (background) and 1 (polyp) per image.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = PILImageResampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ):
        # Written against `BaseImageProcessor` alone, whose public surface is the same in transformers 4.57 and 5.x
        # (5.x's backends and 4.x's `preprocess` helpers are not).
        kwargs.pop("threshold", None)  # older preprocessor_config.json files: the threshold lives in the model config
        kwargs.pop("do_convert_rgb", None)  # always on: every image is converted to RGB
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = dict(size) if size is not None else {"height": 256, "width": 256}
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_DEFAULT_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_DEFAULT_STD)

    def __call__(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, segmentation_maps=segmentation_maps, **kwargs)

    def preprocess(self, images, segmentation_maps=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """
        Args:
            images: one image or a list of them: PIL images of any mode, or arrays / tensors shaped `(H, W)`,
                `(H, W, C)` or `(C, H, W)` of any common dtype.
            segmentation_maps: optionally, one mask per image, in the same kinds (0/1 or 0/255, any channels).
            return_tensors: `"pt"` (default), `"np"` or `None`.
            kwargs: any of the processor's attributes (`size`, `do_normalize`, ...) for this call only.

        Returns:
            A `BatchFeature` with `pixel_values` `(B, 3, height, width)` float32 and, with `segmentation_maps`,
            `labels` `(B, height, width)` int64.
        """
        unknown = sorted(set(kwargs) - set(self.to_dict()) - {"data_format", "input_data_format"})
        if unknown:
            raise ValueError(f"Unknown argument(s) for {type(self).__name__}: {', '.join(unknown)}.")
        settings = {key: kwargs.get(key, getattr(self, key)) for key in (
            "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"
        )}
        images = _as_list(images)
        data = {"pixel_values": np.stack([self._pixel_values(to_rgb_uint8(image), **settings) for image in images])}
        if segmentation_maps is not None:
            segmentation_maps = _as_list(segmentation_maps)
            if len(segmentation_maps) != len(images):
                raise ValueError(f"Got {len(segmentation_maps)} segmentation maps for {len(images)} images.")
            labels = []
            for index, (image, mask) in enumerate(zip(data["pixel_values"], segmentation_maps)):
                mask = binarize_mask(to_rgb_uint8(mask))
                if settings["do_resize"]:
                    mask = resize_mask(mask, image.shape[-2:])
                elif mask.shape != image.shape[-2:]:
                    raise ValueError(f"Segmentation map {index} is {mask.shape} but its image is {image.shape[-2:]}.")
                labels.append(mask.astype(np.int64))
            data["labels"] = np.stack(labels)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _pixel_values(image: np.ndarray, do_resize, size, resample, do_rescale, rescale_factor, do_normalize,
                      image_mean, image_std) -> np.ndarray:
        """`(H, W, 3)` uint8 -> `(3, height, width)` float32."""
        if do_resize:
            image = np.asarray(PIL.Image.fromarray(image).resize((size["width"], size["height"]), resample=resample))
        values = image.astype(np.float32)
        if do_rescale:
            values = (image.astype(np.float64) * rescale_factor).astype(np.float32)
        if do_normalize:
            values = (values - np.asarray(image_mean, dtype=np.float32)) / np.asarray(image_std, dtype=np.float32)
        return np.ascontiguousarray(np.moveaxis(values, -1, 0))

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | None = None, threshold: float | None = None,
        presence_threshold: float | None = None,
    ) -> list[torch.Tensor]:
        """
        Args:
            outputs: the model's output, whose `logits` are `(B, 1, h, w)`.
            target_sizes: one `(height, width)` per image, usually its original size. `None` keeps the logits' size.
            threshold: foreground probability cut-off. Pass the model's `config.threshold`, the one place the cut-off
                is set (the pipeline, `evaluate_model.py` and `predict.py` all read it there); `None` cuts at the sigmoid's
                midpoint, 0.5.
            presence_threshold: frames whose polyp score (see `post_process_polyp_scores`) is below it get an empty
                mask. Pass the model's `config.presence_threshold`; `None` decides pixel by pixel only.

        Returns:
            One `(height, width)` int64 mask per image: 0 is background, 1 is polyp (with several channels, the
            argmax).
        """
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        threshold = 0.5 if threshold is None else threshold
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} logits.")
        present = [True] * len(logits)
        if presence_threshold is not None and logits.shape[1] == 1:
            present = (self.post_process_polyp_scores(outputs) >= presence_threshold).tolist()
        masks = []
        for index, image_logits in enumerate(logits.float()):
            if target_sizes is not None:
                size = tuple(int(side) for side in target_sizes[index])
                image_logits = F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False)[0]
            if image_logits.shape[0] == 1:
                masks.append((image_logits[0].sigmoid() > threshold).long() * int(present[index]))
            else:
                masks.append(image_logits.argmax(dim=0))
        return masks

    @staticmethod
    def post_process_polyp_scores(outputs) -> torch.Tensor:
        """Each frame's polyp score, its largest polyp probability: `(B,)` float32 in [0, 1] from `(B, 1, h, w)`
        logits. A frame with a score below the model's `config.presence_threshold` is judged polyp-free."""
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        return logits.float().flatten(1).amax(dim=1).sigmoid()


class AttentionUNetSegmentationPipeline(ImageSegmentationPipeline):
    """What `pipeline("image-segmentation", model=<this repository>, trust_remote_code=True)` builds (`config.json`'s
    `custom_pipelines` names it): transformers' image-segmentation pipeline with the semantic post-processing cut at
    `threshold=` (default: the model's `config.threshold`) and frames judged polyp-free at `presence_threshold=`
    (default: `config.presence_threshold`). Returns one `{"label", "mask", "score"}` per label present, the mask a
    PIL image of the input's size, 255 where that label is; the polyp's score is the frame's polyp score, and a frame
    judged polyp-free has no polyp segment."""

    def check_model_type(self, supported_models) -> None:
        # The stock check lists transformers' own classes only, so it logs an error for every remote-code model.
        if getattr(self.model.config, "model_type", None) != "attention_unet":
            super().check_model_type(supported_models)

    def _sanitize_parameters(self, presence_threshold=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if presence_threshold is not None:
            postprocess["presence_threshold"] = presence_threshold
        return preprocess, forward, postprocess

    def postprocess(self, model_outputs, subtask=None, threshold=None, presence_threshold=None, **kwargs) -> list[dict]:
        if subtask not in (None, "semantic"):
            raise ValueError(f"subtask={subtask!r}: this model only does semantic segmentation.")
        config = self.model.config
        threshold = config.threshold if threshold is None else threshold
        if presence_threshold is None:
            presence_threshold = getattr(config, "presence_threshold", None)
        for name, value in (("threshold", threshold), ("presence_threshold", presence_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 < value < 1.0):
                raise ValueError(f"{name}={value!r}: must lie in (0, 1).")
        (mask,) = self.image_processor.post_process_semantic_segmentation(
            model_outputs, target_sizes=model_outputs["target_size"], threshold=threshold,
            presence_threshold=presence_threshold,
        )
        score = float(self.image_processor.post_process_polyp_scores(model_outputs)[0])
        return [
            {"score": score if label == 1 else None, "label": config.id2label[label],
             "mask": PIL.Image.fromarray(((mask == label).numpy() * 255).astype(np.uint8))}
            for label in mask.unique().tolist()
        ]


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)  # a batch `(B, ...)`
    return [images]


__all__ = [
    "AttentionUNetImageProcessor", "AttentionUNetSegmentationPipeline", "binarize_mask", "resize_mask", "to_rgb_uint8",
]
