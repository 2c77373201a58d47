#!/usr/bin/env python
"""Segments polyps in images and colonoscopy videos with an Attention U-Net and writes, for every image and at its
original size, a binary mask and an overlay (and, on request, one heat map per attention gate); for every video, the
overlaid video and a per-frame CSV.

    python predict.py frames/ extra/*.png one.tif --model . --output_dir predictions
    python predict.py frames/ --model . --output_dir predictions --tta --attention_maps
    python predict.py colonoscopy.mp4 --model . --output_dir predictions --every 2
    python predict.py frames/ --onnx model.onnx --output_dir predictions
    python predict.py colonoscopy.mp4 --openvino openvino/model_int8.xml --output_dir predictions

For an input `frame.jpg` the outputs are `frame_mask.png` (0 background, 255 polyp), `frame_overlay.png` (the mask's
outline and a translucent fill over the frame) and, with `--attention_maps`, `frame_attention_<i>.png` per gate,
coarsest first. For a video `clip.mp4` (also .avi, .mkv, .mov; read with PyAV) they are `clip_overlay.mp4` (H.264 at
the source's frame rate and size) and `clip_frames.csv` (frame_index, time_seconds, polyp_present, polyp_score,
polyp_area_fraction, mean_probability; with `--every N` only every N-th frame is segmented, and the frames in between
show its mask). The images' frame-level results go to `predictions.csv` (name, polyp_present, polyp_score,
polyp_area_fraction): a frame's polyp score is its largest polyp probability, and a frame scoring below the model's
`config.presence_threshold` is judged polyp-free (its mask is empty).
INPUT may be files, folders (their images and videos) or glob patterns; grayscale, RGBA and 16-bit images are
converted to RGB and EXIF orientation is applied. Files that cannot be read are reported on stderr and skipped; the
exit status is then 1.
"""

import argparse
import csv
import glob
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from polyp_segmentation.cli import (
    add_float32_matmul_precision_argument,
    add_model_arguments,
    check_model_arguments,
    check_optional_runtimes,
)
from polyp_segmentation.drawing import heat_map, overlay_mask
from polyp_segmentation.inference import read_rgb, segment_frames
from polyp_segmentation.loading import check_input_convention, load_model, load_processor
from polyp_segmentation.runtimes import OnnxSegmenter, OpenVinoSegmenter, import_openvino
from polyp_segmentation.video import VIDEO_EXTENSIONS, segment_video

REPO_ROOT = Path(__file__).resolve().parent
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
IMAGE_CSV_NAME = "predictions.csv"
IMAGE_CSV_FIELDS = ("name", "polyp_present", "polyp_score", "polyp_area_fraction")
RUNTIME_NAMES = {OnnxSegmenter: ", ONNX Runtime", OpenVinoSegmenter: ", OpenVINO"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="Image files, folders or glob patterns.")
    add_model_arguments(parser, help="A saved model folder or a Hub model id. With --onnx or --openvino, only its "
                                     "image processor is used (default then: this repository's).")
    parser.add_argument("--output_dir", required=True, help="Folder for the masks, overlays and attention maps.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per forward pass (default: %(default)s).")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Foreground probability cut-off (default: the model's `config.threshold`; with --onnx or "
                             "--openvino, the one stored in the file).")
    parser.add_argument("--presence_threshold", type=float, default=None,
                        help="Polyp score below which a frame is judged polyp-free (default: the model's "
                             "`config.presence_threshold`; with --onnx or --openvino, the one stored in the file).")
    parser.add_argument("--tta", action="store_true", help="Average the logits of the image and its flips.")
    parser.add_argument("--every", type=int, default=1, metavar="N",
                        help="In videos, segment every N-th frame (default: every frame).")
    parser.add_argument("--attention_maps", action="store_true",
                        help="Also write each attention gate's coefficient map as a heat map.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device of the PyTorch model (default: %(default)s; --onnx and --openvino run on the "
                             "CPU).")
    parser.add_argument("--channels_last", action="store_true",
                        help="Run the PyTorch model in channels-last memory format (whether that is faster on a CPU: "
                             "see benchmarks/bench_cpu.py).")
    add_float32_matmul_precision_argument(parser)
    exported = parser.add_mutually_exclusive_group()
    exported.add_argument("--onnx", default=None, metavar="MODEL.onnx",
                          help="Run this export (see export_onnx.py) with ONNX Runtime on the CPU instead of PyTorch.")
    exported.add_argument("--openvino", default=None, metavar="MODEL.xml",
                          help="Run this OpenVINO model (see export_openvino.py: int8, the fastest on CPUs with "
                               "VNNI) on the CPU instead of PyTorch; needs `pip install openvino`.")
    args = parser.parse_args(argv)
    args.exported = args.onnx or args.openvino
    if args.model is None and args.exported is None:
        parser.error("give --model, or --onnx / --openvino (with --model for a processor other than this "
                     "repository's)")
    if args.batch_size < 1 or args.every < 1:
        parser.error("--batch_size and --every must be at least 1")
    for flag in ("threshold", "presence_threshold"):
        if getattr(args, flag) is not None and not 0.0 < getattr(args, flag) < 1.0:
            parser.error(f"--{flag} must lie in (0, 1)")
    if args.exported is not None and args.channels_last:
        parser.error("--channels_last applies to the PyTorch model, not to --onnx or --openvino")
    check_model_arguments(parser, args)
    if args.openvino is not None:
        check_optional_runtimes(parser, import_openvino)
    return args


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expands files, folders and glob patterns into a sorted, duplicate-free list of files, and the inputs that
    matched nothing."""
    paths, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
        elif path.is_file():
            found = [path]  # named explicitly: tried whatever its extension
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not found:
            missing.append(item)
        paths.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return unique, missing


def output_stems(paths: list[Path]) -> list[str]:
    """Each file's stem; files sharing a stem (`a/x.jpg`, `b/x.png`) get `x`, `x-2`, `x-3`, ..."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def load_segmenter(args: argparse.Namespace):
    """The model (PyTorch, or an export run by ONNX Runtime or OpenVINO), its image processor and its default
    threshold and presence threshold."""
    source = args.model or REPO_ROOT
    processor = load_processor(source, args.revision, args.trust_remote_code)
    if args.exported is not None:
        flag = "--onnx" if args.onnx else "--openvino"
        segmenter = OnnxSegmenter(args.onnx) if args.onnx else OpenVinoSegmenter(args.openvino)
        check_input_convention(segmenter, processor, f"{flag} {args.exported} with the processor of {source}")
        if segmenter.threshold is not None:
            return segmenter, processor, segmenter.threshold, segmenter.presence_threshold
        config = AutoConfig.from_pretrained(source, revision=args.revision, trust_remote_code=True)
        return segmenter, processor, config.threshold, getattr(config, "presence_threshold", None)
    if args.float32_matmul_precision:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    model = load_model(args.model, args.revision, args.trust_remote_code).to(args.device).eval()
    check_input_convention(model.config, processor, str(args.model))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, processor, model.config.threshold, getattr(model.config, "presence_threshold", None)


def iterate_batches(paths: list[Path], stems: list[str], batch_size: int) -> Iterator[tuple[list, list[str]]]:
    """Yields `[(stem, rgb array), ...]` per batch and the names of the files that failed to load."""
    for start in range(0, len(paths), batch_size):
        loaded, failed = [], []
        for path, stem in zip(paths[start : start + batch_size], stems[start : start + batch_size]):
            try:
                loaded.append((stem, read_rgb(path)))
            except Exception as error:  # noqa: BLE001 - any decoding failure skips the file
                failed.append(f"{path}: {type(error).__name__}: {error}")
        yield loaded, failed


def save_outputs(output_dir: Path, stem: str, frame: np.ndarray, result) -> None:
    PIL.Image.fromarray(result.mask.astype(np.uint8) * 255).save(output_dir / f"{stem}_mask.png")
    PIL.Image.fromarray(overlay_mask(frame, result.mask)).save(output_dir / f"{stem}_overlay.png")
    for index, gate_map in enumerate(result.gate_maps or []):
        PIL.Image.fromarray(heat_map(gate_map, frame.shape[:2])).save(output_dir / f"{stem}_attention_{index}.png")


def segment_images(paths, stems, segment, output_dir: Path, batch_size: int) -> tuple[int, list[str]]:
    """Writes each image's outputs and its row of `IMAGE_CSV_NAME`; returns how many were written and the failures."""
    failed, written = [], 0
    if not paths:
        return written, failed
    progress = tqdm(total=len(paths), unit="image", desc="Segmenting images")
    with open(output_dir / IMAGE_CSV_NAME, "w", newline="") as csv_file:
        rows = csv.writer(csv_file)
        rows.writerow(IMAGE_CSV_FIELDS)
        for batch, batch_failures in iterate_batches(paths, stems, batch_size):
            for failure in batch_failures:
                tqdm.write(f"error: cannot read {failure}", file=sys.stderr)
            failed.extend(batch_failures)
            if batch:
                results = segment([frame for _, frame in batch])
                for (stem, frame), result in zip(batch, results):
                    save_outputs(output_dir, stem, frame, result)
                    rows.writerow([stem, int(result.present), f"{result.score:.6f}", f"{result.area_fraction:.6f}"])
                written += len(batch)
            progress.update(len(batch) + len(batch_failures))
    progress.close()
    return written, failed


def segment_videos(paths, stems, segment, output_dir: Path, args) -> tuple[int, list[str]]:
    """Writes each video's overlay and CSV; returns how many were written and the failures."""
    failed, written = [], 0
    for path, stem in zip(paths, stems):
        with tqdm(unit="frame", desc=f"Segmenting {path.name}") as progress:
            try:
                summary = segment_video(segment, path, output_dir / f"{stem}_overlay.mp4",
                                        output_dir / f"{stem}_frames.csv", args.every, args.batch_size,
                                        progress.update)
            except ValueError as error:
                tqdm.write(f"error: cannot read {error}", file=sys.stderr)
                failed.append(str(path))
                continue
        written += 1
        print(f"{path}: {summary.frames} frames ({summary.width}x{summary.height}, {summary.frames_per_second:g} "
              f"frames/s), {summary.segmented_frames} segmented in {summary.seconds:.1f} s "
              f"({summary.frames / summary.seconds:.2f} frames/s) -> {summary.output_video.name}, "
              f"{summary.output_csv.name}")
    return written, failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths, missing = collect_inputs(args.inputs)
    for item in missing:
        print(f"error: {item}: no such file, or no image or video in it", file=sys.stderr)
    if not paths:
        return 1
    segmenter, processor, default_threshold, default_presence_threshold = load_segmenter(args)
    threshold = default_threshold if args.threshold is None else args.threshold
    presence_threshold = default_presence_threshold if args.presence_threshold is None else args.presence_threshold
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def segment(frames):
        return segment_frames(segmenter, processor, frames, threshold, args.tta, args.attention_maps,
                              None if args.exported else args.device, args.channels_last, presence_threshold)

    stems = dict(zip(paths, output_stems(paths)))
    videos = [path for path in paths if path.suffix.lower() in VIDEO_EXTENSIONS]
    images = [path for path in paths if path not in videos]
    written_images, failed_images = segment_images(images, [stems[p] for p in images], segment, output_dir,
                                                   args.batch_size)
    written_videos, failed_videos = segment_videos(videos, [stems[p] for p in videos], segment, output_dir, args)
    failed = [*missing, *failed_images, *failed_videos]

    print(f"Wrote the predictions for {written_images} image(s) and {written_videos} video(s) to {output_dir}"
          f" (threshold {threshold:g}{', flip TTA' if args.tta else ''}{RUNTIME_NAMES.get(type(segmenter), '')}).")
    if failed:
        print(f"{len(failed)} input(s) failed, see above.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
