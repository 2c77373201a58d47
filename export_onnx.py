#!/usr/bin/env python
"""Exports an Attention U-Net to ONNX with a dynamic batch size, height and width, then checks the export against
PyTorch with ONNX Runtime.

    python export_onnx.py --model . --output model.onnx
    python export_onnx.py --model . --output model.onnx --check_images frame1.jpg frame2.png --atol 1e-4

The graph takes `pixel_values` `(batch, 3, height, width)` as `AttentionUNetImageProcessor` makes them (RGB in [0, 1],
which the graph normalises, as the model does; at any height and width: the model's padding to a multiple of its total
stride is part of the graph) and returns `logits`
`(batch, 1, height, width)` and one `attention_<i>` gate coefficient map `(batch, 1, h_i, w_i)` per skip connection,
coarsest first. The model's threshold, labels and input convention (`pixel_values`, `image_mean`, `image_std`) are
stored in the ONNX metadata, where `predict.py --onnx` reads them.

The check runs the check images (by default two Kvasir-SEG frames or examples/ frames) through both runtimes at the
processor's size and at a size that is not a multiple of 32, at batch sizes 1 and N, and prints the largest absolute
logit difference; the script exits with status 1 if it exceeds `--atol`.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from polyp_segmentation.cli import add_model_arguments, check_model_arguments
from polyp_segmentation.inference import read_rgb
from polyp_segmentation.loading import UntrustedRemoteCodeError, load_model, load_processor
from polyp_segmentation.onnx_export import DEFAULT_OPSET, OnnxExportWrapper, export_model

REPO_ROOT = Path(__file__).resolve().parent
CHECK_SIZES = ("256x256", "233x311")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, required=True)
    parser.add_argument("--output", default="model.onnx", help="Path of the ONNX file to write.")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}, the one the dynamo exporter's functions target).")
    parser.add_argument("--check_images", nargs="+", default=None,
                        help="Images to compare ONNX Runtime and PyTorch on (default: two Kvasir-SEG frames from "
                             "$KVASIR_SEG_DIR or ../shared/data/kvasir-seg, else two of examples/, else random "
                             "inputs).")
    parser.add_argument("--check_sizes", nargs="+", default=list(CHECK_SIZES), metavar="HxW",
                        help="Input sizes of the check (default: %(default)s).")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="Largest absolute logit difference the check accepts (default: %(default)s).")
    parser.add_argument("--skip_check", action="store_true", help="Only export.")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    return args


def default_check_images(count: int = 2) -> list[Path]:
    """Kvasir-SEG frames if the data is at hand, else the repository's example frames (possibly none)."""
    root = Path(os.environ.get("KVASIR_SEG_DIR", REPO_ROOT.parent / "shared" / "data" / "kvasir-seg"))
    return sorted((root / "images").glob("*.jpg"))[:count] or sorted((REPO_ROOT / "examples").glob("*.jpg"))[:count]


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: sizes are given as HEIGHTxWIDTH, got {text!r}") from None
    return height, width


def load_check_processor(model_id: str, revision: str | None, trust_remote_code: bool):
    """The model's image processor, or the repository's own when the model folder has none."""
    try:
        return load_processor(model_id, revision, trust_remote_code)
    except UntrustedRemoteCodeError:
        raise
    except (OSError, ValueError):
        return load_processor(REPO_ROOT)


def check_export(onnx_path, model, processor, images: list, sizes: list[tuple[int, int]]) -> dict[str, float]:
    """Largest absolute difference between ONNX Runtime and PyTorch, over `sizes` and batch sizes 1 and
    `len(images)`, for the logits and for the attention maps. `images` are arrays or PIL images; `None` entries are
    replaced by random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapper = OnnxExportWrapper(model).eval()
    worst = {"logits": 0.0, "attentions": 0.0, "largest_logit": 0.0}
    for height, width in sizes:
        if images:
            pixel_values = processor(images=images, size={"height": height, "width": width},
                                     return_tensors="pt")["pixel_values"]
        else:
            generator = torch.Generator().manual_seed(0)
            pixel_values = torch.rand(2, model.config.num_channels, height, width, generator=generator)
        for batch in sorted({1, len(pixel_values)}):
            inputs = pixel_values[:batch].contiguous()
            with torch.no_grad():
                expected = wrapper(inputs)
            actual = session.run(None, {"pixel_values": inputs.numpy()})
            if len(actual) != len(expected):
                raise RuntimeError(f"The ONNX graph has {len(actual)} outputs, PyTorch gives {len(expected)}.")
            for index, (ours, reference) in enumerate(zip(actual, expected)):
                if ours.shape != tuple(reference.shape):
                    raise RuntimeError(f"Output {index} is {ours.shape} in ONNX Runtime, {tuple(reference.shape)} in "
                                       f"PyTorch, for input {tuple(inputs.shape)}.")
                key = "logits" if index == 0 else "attentions"
                if index == 0:
                    worst["largest_logit"] = max(worst["largest_logit"], float(reference.abs().max()))
                worst[key] = max(worst[key], float(np.abs(ours - reference.numpy()).max()))
            print(f"  input {tuple(inputs.shape)}: max |logits difference| so far {worst['logits']:.3g}")
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnx

    model = load_model(args.model, args.revision, args.trust_remote_code).eval()
    print(f"Exporting {args.model} to {args.output} (opset {args.opset}, dynamic batch, height and width)...")
    output = export_model(model, args.output, args.opset, source=args.model)
    onnx.checker.check_model(str(output))
    print(f"Wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    if args.skip_check:
        return 0

    processor = load_check_processor(args.model, args.revision, args.trust_remote_code)
    image_paths = args.check_images if args.check_images is not None else default_check_images()
    images = [read_rgb(path) for path in image_paths]
    sizes = [parse_size(size) for size in args.check_sizes]
    source = f"{len(images)} image(s)" if images else "random inputs (no check images found)"
    print(f"Checking ONNX Runtime against PyTorch on {source} at {', '.join(args.check_sizes)}:")
    worst = check_export(output, model, processor, images, sizes)
    verdict = "OK" if worst["logits"] <= args.atol else "FAILED"
    print(f"max abs logit difference: {worst['logits']:.3g} (logits up to {worst['largest_logit']:.3g} in magnitude; "
          f"attention maps: {worst['attentions']:.3g}); atol {args.atol:g}: {verdict}")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
