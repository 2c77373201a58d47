#!/usr/bin/env python
"""Evaluates a saved Attention U-Net on a split of Kvasir-SEG (or any folder or Hub copy laid out like it).

    python evaluate_model.py --model . --dataset_name ../shared/data/kvasir-seg --split test --output_json eval/test.json

Prints the seed card's table (Dice, IoU, F1, precision, recall, accuracy, loss), both as the mean over images (the
polyp literature's mDice / mIoU) and pooled over all pixels. Images and masks are resized to `--resolution` (default:
the image processor's size) exactly as training validates them. The JSON holds the figures, per-image scores, the
weights' sha256 and revision, the split's file-list hash and the command, so a model card can be generated from it.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import cached_file
from transformers.utils.hub import extract_commit_hash

from polyp_segmentation.cli import (
    add_float32_matmul_precision_argument,
    add_model_arguments,
    check_model_arguments,
    check_optional_runtimes,
    write_output_json,
)
from polyp_segmentation.data import (
    DEFAULT_DATASET,
    DataError,
    PolypSegmentationDataset,
    decode_samples,
    largest_polyp_free_crops,
    load_negative_splits,
    load_splits,
    polyp_free_crops,
    processor_normalization,
)
from polyp_segmentation.inference import is_polyp_present, predict_logits
from polyp_segmentation.loading import file_sha256, load_model_and_processor
from polyp_segmentation.metrics import (
    METRIC_NAMES,
    confusion_counts,
    counts_with_frames_judged_free,
    false_alarm_summary,
    format_table,
    metrics_from_counts,
    presence_threshold_for,
    roc_auc,
    summarize,
)
from polyp_segmentation.runtimes import import_openvino, load_openvino_segmenter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, required=True)
    parser.add_argument("--dataset_name", default=DEFAULT_DATASET,
                        help="A Hub dataset id, or a local folder with images/, masks/ and splits/.")
    parser.add_argument("--image_column_name", default=None)
    parser.add_argument("--label_column_name", default=None)
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--resolution", type=int, default=None,
                        help="Side the frames are resized to (default: the image processor's size, the model's).")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--tta", action="store_true", help="Average the logits of the input and its flips.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_float32_matmul_precision_argument(parser)
    parser.add_argument("--negative_dataset_name", default=None,
                        help="Also score polyp-free frames: a folder with images/ and splits/ (or a Hub dataset of "
                             "images) whose --negative_split is read, and polyp-free crops of the evaluated split's "
                             "own frames; reports the false-alarm rates and how well a frame score tells the two kinds "
                             "of frame apart.")
    parser.add_argument("--presence_threshold", type=float, default=None,
                        help="Polyp score below which a frame is judged polyp-free and its mask emptied (default: "
                             "the model's `config.presence_threshold`).")
    parser.add_argument("--choose_presence_threshold", type=float, default=None, metavar="MIN_SENSITIVITY",
                        help="Choose the presence threshold on this split (validation only) as the largest that still "
                             "judges MIN_SENSITIVITY of its frames with a polyp to hold one (e.g. 0.98), write it to "
                             "the --model folder's config.json, and report the figures with it.")
    parser.add_argument("--negative_split", default="validation", choices=["train", "validation"])
    parser.add_argument("--openvino", default=None, metavar="MODEL.xml",
                        help="Score this OpenVINO export of --model (export_openvino.py, e.g. int8) instead of the "
                             "PyTorch model; the loss is --model's loss on its logits. Needs `pip install openvino`.")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.openvino is not None:
        check_optional_runtimes(parser, import_openvino)
    if args.openvino is not None and args.choose_presence_threshold is not None:
        parser.error("--choose_presence_threshold chooses the PyTorch model's threshold: leave out --openvino")
    if args.choose_presence_threshold is not None:
        if args.split != "validation" or (args.negative_dataset_name and args.negative_split != "validation"):
            parser.error("--choose_presence_threshold chooses on validation frames only: pass --split validation "
                         "(and --negative_split validation).")
        if not Path(args.model).is_dir():
            parser.error("--choose_presence_threshold writes the model folder's config.json: --model must be a local "
                         "folder.")
        if not 0.0 < args.choose_presence_threshold <= 1.0:
            parser.error(f"--choose_presence_threshold must lie in (0, 1], got {args.choose_presence_threshold}.")
    return args


def weights_provenance(model_id: str, revision: str | None) -> dict:
    """sha256 of the `model.safetensors` that was evaluated and, for a Hub model, the commit it came from."""
    path = cached_file(model_id, "model.safetensors", revision=revision)
    revision = None if Path(model_id).is_dir() else extract_commit_hash(path, None)
    return {"weights_sha256": file_sha256(path), "revision": revision}


def score_dataset(model, segmenter, dataset: PolypSegmentationDataset, args: argparse.Namespace, threshold: float,
                  description: str) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Per-image confusion counts `(N, 4)` at `threshold`, the mean loss and each image's polyp score (its largest
    probability) `(N,)`, of `segmenter`'s logits (the model, or an export called like it) with `model`'s loss."""
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_eval_batch_size)
    counts, loss_sum, scores = [], 0.0, []
    with torch.inference_mode():
        for batch in tqdm(dataloader, desc=f"{description} ({len(dataset)} images)"):
            pixel_values, labels = batch["pixel_values"].to(args.device), batch["labels"].to(args.device)[:, None]
            logits = predict_logits(segmenter, pixel_values, args.tta)
            probabilities = logits.float().sigmoid()
            counts.append(confusion_counts(probabilities > threshold, labels).cpu())
            scores.append(probabilities.flatten(1).amax(dim=1).cpu())
            loss_sum += model.compute_loss(logits, labels).item() * len(labels)
    return torch.cat(counts), loss_sum / len(dataset), torch.cat(scores)


def score_negatives(
    model, segmenter, args: argparse.Namespace, threshold: float, normalization, names: list[str],
    images: list[torch.Tensor], masks: list[torch.Tensor],
) -> dict[str, tuple[str, list[str], torch.Tensor, torch.Tensor]]:
    """Description, frame names, counts and polyp scores of the polyp-free frames of `--negative_dataset_name` (key
    `negatives`) and of two kinds of polyp-free crops of the evaluated frames: random squares that may hold the border
    (`own_crops`, as training validates on) and each frame's largest square away from the polyp and the border
    (`largest_crops`)."""
    samples = load_negative_splits(args.negative_dataset_name)[args.negative_split]
    negative_names, negative_images, _, problems = decode_samples(samples, args.resolution)
    if problems:
        listing = "\n  ".join(problems)
        raise DataError(f"{len(problems)} unusable frame(s) in {args.negative_dataset_name}:\n  {listing}")
    sources = {"negatives": (f"{args.negative_split} split of {args.negative_dataset_name}", negative_names,
                             negative_images),
               "own_crops": (f"random polyp-free squares of the {args.split} frames (border included)",
                             *polyp_free_crops(names, images, masks)),
               "largest_crops": (f"largest polyp-free squares of the {args.split} frames away from the border",
                                 *largest_polyp_free_crops(names, images, masks))}
    scored = {}
    for key, (source, frame_names, frames) in sources.items():
        if not frames:
            continue
        empty = [torch.zeros(frame.shape[-2:], dtype=torch.bool) for frame in frames]
        dataset = PolypSegmentationDataset(frame_names, frames, empty, *normalization)
        counts, _, scores = score_dataset(model, segmenter, dataset, args, threshold, source)
        scored[key] = (source, frame_names, counts, scores)
    return scored


def negative_summary(source: str, names: list[str], counts: torch.Tensor, scores: torch.Tensor,
                     positive_counts: torch.Tensor, positive_scores: torch.Tensor, threshold: float,
                     presence_threshold: float | None) -> dict:
    """False alarms of the raw logits (what a user thresholding `logits.sigmoid()` sees), the frame-level decision's
    specificity (the share judged polyp-free, whose masks the processor empties), the ROC AUC of two frame scores
    (largest probability, marked area) against the frames with a polyp, and each frame's score and marked area."""
    marked_area = lambda c: c[:, :2].sum(1).double() / c.sum(1).double()  # noqa: E731
    judged_present = [is_polyp_present(score, threshold, presence_threshold) for score in scores.tolist()]
    return {
        "source": source, "num_images": len(scores), **false_alarm_summary(counts),
        "specificity": 1.0 - sum(judged_present) / len(scores),
        "roc_auc_max_probability": roc_auc(positive_scores, scores),
        "roc_auc_marked_area": roc_auc(marked_area(positive_counts), marked_area(counts)),
        "per_image": [{"name": name, "polyp_score": score, "marked_fraction": fraction, "polyp_present": present}
                      for name, score, fraction, present in zip(names, scores.tolist(), marked_area(counts).tolist(),
                                                                judged_present)],
    }


def write_presence_threshold(model_dir: str, value: float) -> None:
    """Stores `value` as `presence_threshold` in the local model folder's config.json, every other field unchanged."""
    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text())
    config["presence_threshold"] = value
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.float32_matmul_precision:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    model, processor = load_model_and_processor(args.model, args.revision, args.trust_remote_code, args.device)
    segmenter = model
    if args.openvino is not None:
        segmenter = load_openvino_segmenter(args.openvino, processor, args.model)
    threshold = model.config.threshold
    args.resolution = args.resolution or processor.size["height"]

    splits, _ = load_splits(args.dataset_name, args.image_column_name, args.label_column_name)
    samples = splits[args.split][: args.max_eval_samples] if args.max_eval_samples else splits[args.split]
    names, images, masks, problems = decode_samples(samples, args.resolution)
    if problems:
        raise DataError(f"{len(problems)} unusable sample(s) in the {args.split} split:\n  " + "\n  ".join(problems))
    normalization = processor_normalization(processor)
    dataset = PolypSegmentationDataset(names, images, masks, *normalization)
    raw_counts, loss, scores = score_dataset(model, segmenter, dataset, args, threshold, args.split)
    negatives = None
    if args.negative_dataset_name:
        negatives = score_negatives(model, segmenter, args, threshold, normalization, names, images, masks)
    presence_threshold = getattr(model.config, "presence_threshold", None) if args.presence_threshold is None \
        else args.presence_threshold
    if args.choose_presence_threshold is not None:
        # A score of exactly 1 (float32 saturates) would make a threshold the config refuses.
        presence_threshold = min(presence_threshold_for(scores, args.choose_presence_threshold), 1.0 - 1e-6)
        write_presence_threshold(args.model, presence_threshold)
        print(f"Chose presence threshold {presence_threshold:.6f} (at least {args.choose_presence_threshold:g} of the "
              f"{args.split} frames with a polyp judged to hold one); wrote it to {args.model}/config.json.")
    counts = counts_with_frames_judged_free(raw_counts, scores, presence_threshold)
    summary = summarize(counts)
    per_image = metrics_from_counts(counts)

    print(f"\n{args.openvino or args.model} on the {args.split} split of {args.dataset_name} ({len(dataset)} images, "
          f"{args.resolution}x{args.resolution}{', flip TTA' if args.tta else ''}):\n")
    print(format_table(summary, loss))
    sensitivity = sum(is_polyp_present(score, threshold, presence_threshold) for score in scores.tolist()) / len(scores)
    if negatives is not None:
        negatives = {key: negative_summary(*scored, raw_counts, scores, threshold, presence_threshold)
                     for key, scored in negatives.items()}
        print(f"\nFrames with a polyp judged to hold one (presence threshold {presence_threshold}): "
              f"{sensitivity:.3f}\n")
        print("| polyp-free frames | images | > 1 % marked (raw logits) | any pixel marked | judged polyp-free | "
              "ROC AUC (max probability) | ROC AUC (marked area) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for entry in negatives.values():
            print(f"| {entry['source']} | {entry['num_images']} | {entry['false_alarm_rate']:.3f} | "
                  f"{entry['any_pixel_rate']:.3f} | {entry['specificity']:.3f} | "
                  f"{entry['roc_auc_max_probability']:.3f} | {entry['roc_auc_marked_area']:.3f} |")
    result = {
        "model": args.model,
        **weights_provenance(args.model, args.revision),
        **({"openvino": args.openvino, "openvino_precision": segmenter.metadata.get("precision"),
            "openvino_sha256": file_sha256(Path(args.openvino).with_suffix(".bin"))} if args.openvino else {}),
        "dataset_name": args.dataset_name,
        "split": args.split,
        "split_sha256": hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest(),
        "num_images": len(dataset),
        "resolution": args.resolution,
        "threshold": threshold,
        "presence_threshold": presence_threshold,
        "tta": args.tta,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "metrics": summary,
        "loss": loss,
        "per_image": [
            {"name": name, **{metric: per_image[metric][i].item() for metric in METRIC_NAMES}}
            for i, name in enumerate(names)
        ],
        "frame_sensitivity": sensitivity,
        **({"negatives": negatives} if negatives is not None else {}),
        "command": " ".join(["python evaluate_model.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    write_output_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
