#!/usr/bin/env python
"""Exports an Attention U-Net for OpenVINO on CPUs, quantized to int8 by NNCF (or in float32), and checks it against
the PyTorch float32 model before writing it.

    python export_openvino.py --model . --dataset_name ../shared/data/kvasir-seg \
        --negative_dataset_name ../shared/data/nopolyp --output openvino/model_int8.xml
    python predict.py frames/ --openvino openvino/model_int8.xml --output_dir predictions

Needs `pip install openvino nncf`. The model goes through the ONNX export (export_onnx.py's graph: `pixel_values`
RGB in [0, 1] at any batch size, height and width; `logits` and the gate maps), then NNCF's post-training quantization
(symmetric int8 weights per channel, asymmetric int8 activations) with activation ranges from `--calibration_samples`
frames of the training split only (a quarter of them polyp-free frames of `--negative_dataset_name`'s training split
when it is given). The layers in `--float32_layers` stay in float32.

The check runs the `--check_split` frames (and the polyp-free validation frames of `--negative_dataset_name`) through
both models at the processor's size and compares, per frame, the share of pixels whose mask differs and the
frame-level decision (polyp present or not). The model is written only if the median `--check_split` frame's masks
differ on at most `--max_mask_disagreement` of the pixels and, in each source, at most `--max_decision_changes` of
the frames change their decision; otherwise the script exits with status 1, naming the worst frame, and any file
already at `--output` is kept. The check's figures go to `<output>.json`.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import onnx
import torch

from polyp_segmentation.cli import (
    add_model_arguments,
    check_model_arguments,
    check_optional_runtimes,
    write_output_json,
)
from polyp_segmentation.data import (
    DEFAULT_DATASET,
    DataError,
    PolypSegmentationDataset,
    RawSample,
    decode_samples,
    load_negative_splits,
    load_splits,
    processor_normalization,
)
from polyp_segmentation.loading import load_model_and_processor
from polyp_segmentation.onnx_export import export_model
from polyp_segmentation.quantization import (
    FLOAT32_LAYERS,
    calibration_samples,
    compare_segmenters,
    import_nncf,
    openvino_float32,
    quantize_onnx,
)
from polyp_segmentation.runtimes import OpenVinoSegmenter, import_openvino


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, required=True)
    parser.add_argument("--output", default="openvino/model_int8.xml",
                        help="The OpenVINO model to write (.xml; its weights go to the .bin beside it).")
    parser.add_argument("--precision", choices=("int8", "float32"), default="int8")
    parser.add_argument("--dataset_name", default=DEFAULT_DATASET,
                        help="Kvasir-SEG as a folder or Hub dataset: its train split calibrates, its --check_split "
                             "checks.")
    parser.add_argument("--negative_dataset_name", default=None,
                        help="Polyp-free frames (a folder with images/ and splits/, or a Hub dataset): its train split "
                             "joins the calibration, its validation split the check.")
    parser.add_argument("--calibration_samples", type=int, default=128,
                        help="Training frames whose activations set the int8 ranges (default: %(default)s).")
    parser.add_argument("--float32_layers", nargs="*", default=list(FLOAT32_LAYERS), metavar="PATTERN",
                        help="Layers left in float32, as regular expressions on their PyTorch weight names (default: "
                             "%(default)s; none with an empty list).")
    parser.add_argument("--check_split", default="validation", choices=["validation", "test"])
    parser.add_argument("--max_check_samples", type=int, default=None)
    parser.add_argument("--max_mask_disagreement", type=float, default=0.01,
                        help="Largest share of differing mask pixels accepted for the median --check_split frame "
                             "(default: %(default)s).")
    parser.add_argument("--max_decision_changes", type=float, default=0.02,
                        help="Largest share of check frames whose frame-level decision may change (default: "
                             "%(default)s).")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    check_optional_runtimes(parser, import_openvino, *([import_nncf] if args.precision == "int8" else []))
    if Path(args.output).suffix != ".xml":
        parser.error(f"--output {args.output}: an OpenVINO model is written as an .xml file (and a .bin beside it)")
    if args.calibration_samples < 1:
        parser.error(f"--calibration_samples {args.calibration_samples}: give at least 1")
    return args


def processed_frames(samples: list[RawSample], resolution: int, normalization,
                     what: str) -> list[tuple[str, torch.Tensor]]:
    """`(name, (C, H, W) pixel values)` per sample, as evaluation makes them."""
    names, images, masks, problems = decode_samples(samples, resolution)
    if problems:
        raise DataError(f"{len(problems)} unusable frame(s) in the {what}:\n  " + "\n  ".join(problems))
    dataset = PolypSegmentationDataset(names, images, masks, *normalization)
    return [(name, dataset[index]["pixel_values"]) for index, name in enumerate(names)]


def collect_frames(args, resolution: int, normalization) -> tuple[list, dict[str, list]]:
    """Calibration frames (training splits only) and check frames per source."""
    splits, _ = load_splits(args.dataset_name)
    negatives = load_negative_splits(args.negative_dataset_name) if args.negative_dataset_name else None
    samples = calibration_samples(splits["train"], negatives["train"] if negatives else None, args.calibration_samples)
    calibration = processed_frames(samples, resolution, normalization, "training frames")
    check_samples = splits[args.check_split][: args.max_check_samples]
    checks = {args.check_split: processed_frames(check_samples, resolution, normalization,
                                                 f"{args.check_split} split of {args.dataset_name}")}
    if negatives:
        checks["polyp-free validation"] = processed_frames(
            negatives["validation"][: args.max_check_samples], resolution, normalization,
            f"validation split of {args.negative_dataset_name}")
    return calibration, checks


def check_against_pytorch(model, candidate, checks: dict[str, list], args) -> dict:
    """The check's figures per source of frames, and whether they are within the stated tolerances."""
    threshold = model.config.threshold
    presence_threshold = getattr(model.config, "presence_threshold", None)
    report, reasons = {"checks": {}}, []
    for source, frames in checks.items():
        agreement = compare_segmenters(model, candidate, frames, threshold, presence_threshold)
        summary = agreement.summary()
        report["checks"][source] = summary
        changed_share = len(summary["decision_changes"]) / summary["num_frames"]
        print(f"{source} ({summary['num_frames']} frames): masks differ on "
              f"{100 * summary['median_mask_disagreement']:.2f} % of the pixels for the median frame "
              f"(worst {summary['worst_frame']}: "
              f"{100 * summary['worst_mask_disagreement']:.2f} %); {len(summary['decision_changes'])} frame-level "
              f"decision(s) changed; largest polyp score difference {summary['largest_polyp_score_difference']:.4f}; "
              f"frames > 1 % marked after the presence gate: {summary['reference_marked_rate']:.3f} float32, "
              f"{summary['candidate_marked_rate']:.3f} {args.precision}")
        # On polyp-free frames the float32 model's probabilities hover near the threshold over large areas where
        # it marks anything at all, so pixels flip there: what must hold is the frame-level decision.
        if source == args.check_split and summary["median_mask_disagreement"] > args.max_mask_disagreement:
            reasons.append(f"on the {source} frames the median frame's masks differ on "
                           f"{100 * summary['median_mask_disagreement']:.2f} % of the pixels (> "
                           f"{100 * args.max_mask_disagreement:g} %; worst {summary['worst_frame']}).")
        if changed_share > args.max_decision_changes:
            reasons.append(f"on the {source} frames {len(summary['decision_changes'])} of {summary['num_frames']} "
                           f"frames change their frame-level decision (> {100 * args.max_decision_changes:g} %): "
                           f"{', '.join(summary['decision_changes'][:5])}.")
    report.update(accepted=not reasons, reason=" ".join(reasons) or None,
                  max_mask_disagreement=args.max_mask_disagreement, max_decision_changes=args.max_decision_changes)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    openvino = import_openvino()
    model, processor = load_model_and_processor(args.model, args.revision, args.trust_remote_code)
    resolution = processor.size["height"]
    calibration, checks = collect_frames(args, resolution, processor_normalization(processor))
    output = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="export_openvino_") as work:
        onnx_path = export_model(model, Path(work) / "model.onnx", source=args.model)
        metadata = {entry.key: entry.value for entry in onnx.load(str(onnx_path)).metadata_props}
        metadata["precision"] = args.precision
        if args.precision == "int8":
            print(f"Quantizing to int8 with {len(calibration)} training frames; float32 layers: "
                  f"{args.float32_layers or 'none'}")
            exported = quantize_onnx(onnx_path, [pixels[None].numpy() for _, pixels in calibration], metadata,
                                     tuple(args.float32_layers))
        else:
            exported = openvino_float32(onnx_path, metadata)
        candidate_path = Path(work) / output.name
        openvino.save_model(exported, str(candidate_path), compress_to_fp16=False)
        candidate = OpenVinoSegmenter(candidate_path)
        report = check_against_pytorch(model, candidate, checks, args)
        report.update(precision=args.precision, calibration_frames=len(calibration),
                      float32_layers=args.float32_layers, source_model=args.model,
                      command=" ".join(["python export_openvino.py", *(sys.argv[1:] if argv is None else argv)]))
        if not report["accepted"]:
            print(f"Refused: {report['reason']} Nothing written; {output} is left as it was.", file=sys.stderr)
            return 1
        output.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".bin", ".xml"):  # the .xml last: it is what names a complete model
            shutil.move(candidate_path.with_suffix(suffix), output.with_suffix(suffix))
    write_output_json(output.with_suffix(".json"), report)
    print(f"Wrote {output} and {output.with_suffix('.bin').name} ({args.precision}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
