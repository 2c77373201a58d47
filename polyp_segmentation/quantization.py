"""Int8 post-training quantization for CPUs: NNCF quantizes the ONNX export's graph, read by OpenVINO, from
calibration frames of the training split; OpenVINO runs it with the CPU's int8 dot-product instructions (AVX-512 VNNI,
AVX-VNNI, AMX). `compare_segmenters` checks the int8 model's masks against the float32 model's."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyp_segmentation.inference import is_polyp_present, polyp_scores, predict_logits
from polyp_segmentation.metrics import FALSE_ALARM_AREA
from polyp_segmentation.runtimes import (
    NNCF_REQUIREMENT,
    OPENVINO_METADATA_SECTION,
    MissingRuntimeError,
    import_openvino,
)

# Layers kept in float32, by the name of their weights in the PyTorch model (regular expressions): chosen with
# benchmarks/int8_layers.py (benchmarks/int8_layers.json; docs/deployment.md).
FLOAT32_LAYERS = (r"encoder\.stem_0",)
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul")
NEGATIVE_CALIBRATION_SHARE = 0.25


def import_nncf():
    # NNCF sends usage telemetry to Google Analytics unless NNCF_CI is set when it is first imported
    # (nncf/telemetry/wrapper.py); this project makes no network call the user did not ask for.
    if not os.environ.get("NNCF_CI"):
        os.environ["NNCF_CI"] = "1"
    try:
        import nncf
    except ImportError as error:
        raise MissingRuntimeError(
            f"Quantizing to int8 needs NNCF: pip install {NNCF_REQUIREMENT} ({error})."
        ) from error
    return nncf


def calibration_samples(frames: list, polyp_free_frames: list | None, count: int) -> list:
    """`count` training samples spread evenly over each split (so that no one part of it calibrates), a quarter of
    them from `polyp_free_frames` when given: the frames the model meets in use hold no polyp as often as one."""
    negative_count = round(count * NEGATIVE_CALIBRATION_SHARE) if polyp_free_frames else 0

    def evenly_spaced(samples: list, wanted: int) -> list:
        return [samples[int(i * len(samples) / wanted)] for i in range(min(wanted, len(samples)))]

    return evenly_spaced(frames, count - negative_count) + evenly_spaced(polyp_free_frames or [], negative_count)


def weight_names(op) -> list[str]:
    """The tensor names of the constant that feeds `op`'s weights input (through converts and reshapes)."""
    node = op.input_value(1).get_node()
    while node.get_type_name() != "Constant" and node.get_input_size() > 0:
        node = node.input_value(0).get_node()
    return sorted(node.output(0).get_names()) if node.get_type_name() == "Constant" else []


def ops_of_layers(model, patterns: tuple[str, ...]) -> list[str]:
    """Names of the OpenVINO ops whose weights are those of the PyTorch layers matching `patterns`."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in WEIGHTED_OPS and any(
            re.search(pattern, name) for pattern in patterns for name in weight_names(op)
        ):
            found.append(op.get_friendly_name())
    return found


def quantize_onnx(onnx_path: str | Path, calibration: list[np.ndarray], metadata: dict[str, str],
                  float32_layers: tuple[str, ...] = FLOAT32_LAYERS, fast_bias_correction: bool = True):
    """The ONNX export as an OpenVINO model quantized to int8 (NNCF's mixed preset: symmetric weights per channel,
    asymmetric activations), its activation ranges from `calibration` (`(1, C, H, W)` float32 arrays, as the image
    processor makes them), `float32_layers` left in float32, and `metadata` in its `rt_info`."""
    openvino = import_openvino()
    nncf = import_nncf()
    model = openvino.Core().read_model(str(onnx_path))
    kept = ops_of_layers(model, float32_layers) if float32_layers else []
    if float32_layers and not kept:
        raise ValueError(f"No layer of {onnx_path} matches {list(float32_layers)}: nothing would stay in float32.")
    quantized = nncf.quantize(
        model,
        nncf.Dataset(calibration),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration),
        fast_bias_correction=fast_bias_correction,
        ignored_scope=nncf.IgnoredScope(names=kept) if kept else None,
    )
    for key, value in metadata.items():
        quantized.set_rt_info(value, [OPENVINO_METADATA_SECTION, key])
    return quantized


def openvino_float32(onnx_path: str | Path, metadata: dict[str, str]):
    """The ONNX export as an OpenVINO model in float32 (no calibration), with `metadata` in its `rt_info`."""
    model = import_openvino().Core().read_model(str(onnx_path))
    for key, value in metadata.items():
        model.set_rt_info(value, [OPENVINO_METADATA_SECTION, key])
    return model


@dataclass
class SegmenterAgreement:
    """How a candidate segmenter's results differ from a reference's on the same frames: per frame, the share of
    pixels whose mask differs, the share each marks as polyp and the polyp scores; and which frames change their
    frame-level decision."""

    names: list[str]
    mask_disagreement: list[float]
    reference_marked: list[float]
    candidate_marked: list[float]
    reference_scores: list[float]
    candidate_scores: list[float]
    decision_changes: list[str]

    @property
    def median_mask_disagreement(self) -> float:
        return float(np.median(self.mask_disagreement))

    @property
    def worst(self) -> tuple[str, float]:
        index = int(np.argmax(self.mask_disagreement))
        return self.names[index], self.mask_disagreement[index]

    @property
    def largest_score_difference(self) -> float:
        return float(np.max(np.abs(np.subtract(self.reference_scores, self.candidate_scores))))

    def summary(self) -> dict:
        worst_name, worst_value = self.worst
        return {
            "num_frames": len(self.names),
            "median_mask_disagreement": self.median_mask_disagreement,
            "worst_mask_disagreement": worst_value,
            "worst_frame": worst_name,
            "largest_polyp_score_difference": self.largest_score_difference,
            "decision_changes": self.decision_changes,
            # Frames with more than FALSE_ALARM_AREA marked: the false-alarm rate where the frames are polyp-free.
            "reference_marked_rate": float(np.mean(np.array(self.reference_marked) > FALSE_ALARM_AREA)),
            "candidate_marked_rate": float(np.mean(np.array(self.candidate_marked) > FALSE_ALARM_AREA)),
        }


def compare_segmenters(reference, candidate, frames: list[tuple[str, torch.Tensor]], threshold: float,
                       presence_threshold: float | None, batch_size: int = 8) -> SegmenterAgreement:
    """Runs `reference` and `candidate` (the PyTorch model, or anything called like it) on `frames` (name and
    `(C, H, W)` pixel values) and compares their masks (`threshold` on the probability, emptied for frames judged
    polyp-free) and frame-level decisions."""
    names, disagreement, marked, frame_scores, changes = [], [], ([], []), ([], []), []
    for start in range(0, len(frames), batch_size):
        batch = frames[start : start + batch_size]
        pixel_values = torch.stack([pixels for _, pixels in batch])
        results = []
        for segmenter in (reference, candidate):
            with torch.inference_mode():
                logits = predict_logits(segmenter, pixel_values).float().cpu()
            scores = polyp_scores(logits).tolist()
            present = torch.tensor([is_polyp_present(s, threshold, presence_threshold) for s in scores])
            masks = (logits.sigmoid() > threshold)[:, 0] & present[:, None, None]
            results.append((masks, scores, present))
        (reference_masks, ref_scores, ref_present), (candidate_masks, cand_scores, cand_present) = results
        for index, (name, _) in enumerate(batch):
            names.append(name)
            disagreement.append(float((reference_masks[index] != candidate_masks[index]).float().mean()))
            marked[0].append(float(reference_masks[index].float().mean()))
            marked[1].append(float(candidate_masks[index].float().mean()))
            if bool(ref_present[index]) != bool(cand_present[index]):
                changes.append(name)
        frame_scores[0].extend(ref_scores)
        frame_scores[1].extend(cand_scores)
    return SegmenterAgreement(names, disagreement, *marked, *frame_scores, changes)
