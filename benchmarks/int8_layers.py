#!/usr/bin/env python
"""Which layers the int8 export keeps in float32: quantizes the model with each candidate set left in float32 and
compares every result with the PyTorch float32 model on the validation frames and on polyp-free validation frames.

    python benchmarks/int8_layers.py --model . --dataset_name ../shared/data/kvasir-seg \
        --negative_dataset_name ../shared/data/nopolyp --output_json benchmarks/int8_layers.json

Per candidate: validation mean Dice, the median and worst share of mask pixels that differ from float32's, the largest
change of a frame's polyp score, and the frames whose frame-level decision changes. Calibration as export_openvino.py
does it (training frames only). `polyp_segmentation.quantization.FLOAT32_LAYERS` is chosen from this table.
"""

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import onnx
import torch

from polyp_segmentation.cli import write_output_json
from polyp_segmentation.data import (
    PolypSegmentationDataset,
    decode_samples,
    load_negative_splits,
    load_splits,
    processor_normalization,
)
from polyp_segmentation.loading import load_model_and_processor
from polyp_segmentation.metrics import confusion_counts, metrics_from_counts
from polyp_segmentation.onnx_export import export_model
from polyp_segmentation.quantization import calibration_samples, compare_segmenters, quantize_onnx
from polyp_segmentation.runtimes import OpenVinoSegmenter, import_openvino

CANDIDATES = {
    "none": (),
    "head": ("segmentation_head",),
    "stem": (r"encoder\.stem_0",),
    "stem_head": (r"encoder\.stem_0", "segmentation_head"),
    "stem_gates": (r"encoder\.stem_0", r"attention_gate\.(psi|gating_proj|skip_proj)"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=".")
    parser.add_argument("--dataset_name", required=True)
    parser.add_argument("--negative_dataset_name", required=True)
    parser.add_argument("--calibration_samples", type=int, default=128)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--output_json", default=None)
    return parser.parse_args(argv)


def frames(samples, resolution, normalization):
    names, images, masks, problems = decode_samples(samples, resolution)
    if problems:
        raise ValueError("\n".join(problems))
    dataset = PolypSegmentationDataset(names, images, masks, *normalization)
    return [(name, dataset[i]["pixel_values"]) for i, name in enumerate(names)], masks


def mean_dice(segmenter, pixel_frames, masks, threshold: float) -> float:
    with torch.inference_mode():
        logits = torch.cat([segmenter(pixel_values=pixels[None]).logits.float() for _, pixels in pixel_frames])
    counts = confusion_counts(logits.sigmoid() > threshold, torch.stack(masks)[:, None].bool())
    return float(metrics_from_counts(counts)["dice"].mean())


def main(argv=None) -> dict:
    args = parse_args(argv)
    openvino = import_openvino()
    model, processor = load_model_and_processor(args.model)
    resolution, normalization = processor.size["height"], processor_normalization(processor)
    splits, _ = load_splits(args.dataset_name)
    negatives = load_negative_splits(args.negative_dataset_name)
    calibration, _ = frames(calibration_samples(splits["train"], negatives["train"], args.calibration_samples),
                            resolution, normalization)
    calibration = [pixels[None].numpy() for _, pixels in calibration]
    validation, validation_masks = frames(splits["validation"], resolution, normalization)
    polyp_free, _ = frames(negatives["validation"], resolution, normalization)
    threshold = model.config.threshold
    command = ["python benchmarks/int8_layers.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    report = {"command": " ".join(command), "settings": vars(args), "candidates": {},
              "float32_validation_mean_dice": mean_dice(model, validation, validation_masks, threshold)}
    with tempfile.TemporaryDirectory() as work:
        onnx_path = export_model(model, Path(work) / "model.onnx", source=args.model)
        metadata = {entry.key: entry.value for entry in onnx.load(str(onnx_path)).metadata_props}
        for name in args.candidates:
            print(f"{name}: float32 layers {list(CANDIDATES[name])}", flush=True)
            quantized = quantize_onnx(onnx_path, calibration, metadata, CANDIDATES[name])
            path = Path(work) / f"{name}.xml"
            openvino.save_model(quantized, str(path), compress_to_fp16=False)
            candidate = OpenVinoSegmenter(path)
            on_validation = compare_segmenters(model, candidate, validation, threshold, None).summary()
            on_polyp_free = compare_segmenters(model, candidate, polyp_free, threshold, None).summary()
            entry = {"float32_layers": list(CANDIDATES[name]),
                     "validation_mean_dice": mean_dice(candidate, validation, validation_masks, threshold),
                     "validation": on_validation, "polyp_free_validation": on_polyp_free}
            report["candidates"][name] = entry
            print(f"  validation mDice {entry['validation_mean_dice']:.4f} (float32 "
                  f"{report['float32_validation_mean_dice']:.4f}); masks differ: median "
                  f"{100 * on_validation['median_mask_disagreement']:.2f} %, worst "
                  f"{100 * on_validation['worst_mask_disagreement']:.2f} %; polyp-free: largest score change "
                  f"{on_polyp_free['largest_polyp_score_difference']:.3f}, "
                  f"{len(on_polyp_free['decision_changes'])} decision(s) changed", flush=True)
    write_output_json(args.output_json, report)
    return report


if __name__ == "__main__":
    main()
