"""Segmenting frames with a loaded model (or anything called like it): flip TTA, the masks at each frame's size,
the frame-level polyp score and decision."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SemanticSegmenterOutput

from image_processing_attention_unet import to_rgb_uint8


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as `(H, W, 3)` uint8 in display orientation (EXIF applied; any mode or bit depth); decoded at
    once, so that a truncated file fails here."""
    with PIL.Image.open(path) as image:
        image.load()
        return to_rgb_uint8(image)


def predict_logits(model, pixel_values: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """`(B, 3, H, W)` -> `(B, 1, H, W)` logits; with `tta`, the mean over the input and its horizontal, vertical and
    double flips (each prediction flipped back)."""
    if not tta:
        return model(pixel_values=pixel_values).logits
    flips = [(), (-1,), (-2,), (-2, -1)]
    logits = [model(pixel_values=pixel_values.flip(dims) if dims else pixel_values).logits for dims in flips]
    return torch.stack([lg.flip(dims) if dims else lg for lg, dims in zip(logits, flips)]).mean(0)


@dataclass
class FrameSegmentation:
    """One frame's result at its original size: `mask` `(H, W)` bool, `probability` `(H, W)` float32 in [0, 1], the
    frame's polyp `score` (its largest probability), whether a polyp is `present` (the mask is empty where not), and
    each gate's coefficients `(1, h, w)`, coarsest first (when asked for)."""

    mask: np.ndarray
    probability: np.ndarray
    score: float
    present: bool
    gate_maps: list[torch.Tensor] | None = None

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean())


def segment_frames(model, processor, frames: list[np.ndarray], threshold: float, tta: bool = False,
                   attention_maps: bool = False, device: str | torch.device | None = None,
                   channels_last: bool = False, presence_threshold: float | None = None) -> list[FrameSegmentation]:
    """`(H, W, 3)` uint8 frames (any sizes) -> one `FrameSegmentation` each. `model` is the PyTorch model or anything
    called like it (the ONNX Runtime session of predict.py); the masks are the processor's post-processing of the
    (flip-averaged, with `tta`) logits, cut at `threshold`, empty for frames whose polyp score is below
    `presence_threshold`."""
    pixel_values = processor(images=frames, return_tensors="pt")["pixel_values"]
    if device is not None:
        pixel_values = pixel_values.to(device)
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    gate_maps = None
    with torch.inference_mode():
        if attention_maps:
            # The gates' maps are those of the frame as given (not of its flips).
            outputs = model(pixel_values=pixel_values, output_attentions=True)
            gate_maps = [gate.float().cpu() for gate in outputs.attentions]
            logits = predict_logits(model, pixel_values, tta=True) if tta else outputs.logits
        else:
            logits = predict_logits(model, pixel_values, tta=tta)
        logits = logits.float().cpu()
        sizes = [frame.shape[:2] for frame in frames]
        # The frame-level decision is made here rather than by the processor, so that processors saved before it
        # existed (without `presence_threshold`) give the same result.
        masks = processor.post_process_semantic_segmentation(
            SemanticSegmenterOutput(logits=logits), target_sizes=sizes, threshold=threshold
        )
        scores = polyp_scores(logits).tolist()
        probabilities = [
            F.interpolate(frame_logits[None], size=size, mode="bilinear", align_corners=False)[0, 0].sigmoid()
            for frame_logits, size in zip(logits, sizes)
        ]
    results = []
    for index, (mask, probability, score) in enumerate(zip(masks, probabilities, scores)):
        present = is_polyp_present(score, threshold, presence_threshold)
        mask = mask.numpy().astype(bool) & present
        results.append(FrameSegmentation(mask, probability.numpy(), score, present,
                                         [gate[index] for gate in gate_maps] if gate_maps is not None else None))
    return results


def polyp_scores(logits: torch.Tensor) -> torch.Tensor:
    """Each frame's polyp score, its largest polyp probability: `(B,)` from `(B, 1, h, w)` logits (as the image
    processor's `post_process_polyp_scores`)."""
    return logits.float().flatten(1).amax(dim=1).sigmoid()


def is_polyp_present(score: float, threshold: float, presence_threshold: float | None) -> bool:
    """The frame-level decision: the polyp score reaches `presence_threshold`, and some pixel passes `threshold`."""
    return score > threshold and (presence_threshold is None or score >= presence_threshold)

