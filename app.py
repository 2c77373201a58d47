#!/usr/bin/env python
"""A Gradio demo of the Attention U-Net, ready for a Hugging Face Space (`sdk: gradio`, `app_file: app.py`).

    python app.py                                   # this repository's weights, on Gradio's default address
    python app.py --model . --server_name 127.0.0.1 --server_port 7860
    python app.py --model . --openvino openvino/model_int8.xml   # the int8 export (export_openvino.py) on the CPU

Frame tab: upload a colonoscopy frame (or click one of the examples/ frames, with and without a polyp) and see the
overlay, the polyp probability as a heat map, each attention gate's coefficients (what the gates let through from
each skip connection), the binary mask, the polyp's share of the frame and the frame's polyp score ("No polyp found"
where the frame is judged polyp-free); the threshold slider and the flip-TTA switch re-run the model. Video tab: a
video (.mp4, .avi, .mkv, .mov) comes back overlaid, with the per-frame CSV that `predict.py` writes. Everything runs
through the `polyp_segmentation` package, the code `predict.py` and `evaluate_model.py` use. A file that cannot be read is
named in a message on the page; the app keeps serving.
"""

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry: the demo must run offline

import gradio as gr  # noqa: E402

from polyp_segmentation.cli import (
    add_float32_matmul_precision_argument,
    add_model_arguments,
    check_model_arguments,
    check_optional_runtimes,
)
from polyp_segmentation.drawing import heat_map, overlay_mask
from polyp_segmentation.inference import read_rgb, segment_frames
from polyp_segmentation.loading import load_model_and_processor
from polyp_segmentation.runtimes import import_openvino, load_openvino_segmenter
from polyp_segmentation.video import VIDEO_EXTENSIONS, segment_video

REPO_ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.jpg"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, default=str(REPO_ROOT))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server_name", default=None,
                        help="Address to listen on (default: Gradio's, 127.0.0.1, or $GRADIO_SERVER_NAME on a Space).")
    parser.add_argument("--server_port", type=int, default=None,
                        help="Port (default: Gradio's, 7860 or the next free one).")
    add_float32_matmul_precision_argument(parser)
    parser.add_argument("--openvino", default=None, metavar="MODEL.xml",
                        help="Run this OpenVINO export of --model (export_openvino.py, e.g. int8) on the CPU instead "
                             "of the PyTorch model; needs `pip install openvino`.")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.openvino is not None:
        check_optional_runtimes(parser, import_openvino)
    return args


class UploadError(ValueError):
    """An upload the app cannot use; its message is shown in the page."""


def read_frame(path: str) -> np.ndarray:
    try:
        return read_rgb(path)
    except Exception as error:  # noqa: BLE001 - any decoding failure is the upload's fault, shown in the page
        raise UploadError(f"Cannot read {Path(path).name} as an image ({type(error).__name__}: {error}).") from error


def example_caption(path: Path) -> str:
    return "polyp-free" if path.stem.startswith("nopolyp") else "with a polyp"


def pick_example(selected: gr.SelectData) -> str:
    return str(EXAMPLES[selected.index])


def problem(message: str) -> str:
    return f'<div class="upload-problem">⚠️ {message}</div>'


def build_demo(model, processor, device: str = "cpu", segmenter=None) -> gr.Blocks:
    """The two-tab app around `model` and its `processor`; `segmenter` (an export of `model`, run on the CPU) runs
    the frames in its place when given."""
    default_threshold = float(model.config.threshold)
    presence_threshold = getattr(model.config, "presence_threshold", None)  # None in configs saved before it
    runs_on = device if segmenter is None else f"the CPU, {segmenter.metadata.get('precision', 'exported')} OpenVINO"

    def segment(frames, threshold, tta, attention_maps=False):
        return segment_frames(segmenter or model, processor, frames, threshold, tta, attention_maps,
                              device if segmenter is None else None, presence_threshold=presence_threshold)

    def on_frame(path, threshold, tta):
        if not path:
            return None, None, None, None, ""
        try:
            frame = read_frame(path)
        except UploadError as error:
            return None, None, None, None, problem(str(error))
        (result,) = segment([frame], threshold, tta, attention_maps=True)
        size = frame.shape[:2]
        gates = [(heat_map(gate, size), f"gate {index + 1} of {len(result.gate_maps)} (coarsest first)")
                 for index, gate in enumerate(result.gate_maps)]
        finding = (f"**Polyp: {100 * result.area_fraction:.1f} % of the frame** (score {result.score:.3f})"
                   if result.present else f"**No polyp found** (score {result.score:.3f})")
        summary = (f"{finding}; {frame.shape[1]}x{frame.shape[0]}, threshold {threshold:.2f}, flip TTA "
                   f"{'on' if tta else 'off'}.")
        return (overlay_mask(frame, result.mask), heat_map(result.probability[None], size), gates,
                result.mask.astype(np.uint8) * 255, summary)

    def on_video(path, every, threshold, tta):
        if not path:
            return None, None, problem("Upload a video first.")
        if Path(path).suffix.lower() not in VIDEO_EXTENSIONS:
            return None, None, problem(f"{Path(path).name} is not a supported video "
                                       f"({', '.join(sorted(VIDEO_EXTENSIONS))}).")
        output_dir = Path(tempfile.mkdtemp(prefix="attention-unet-video-"))
        stem = Path(path).stem
        try:
            summary = segment_video(lambda frames: segment(frames, threshold, tta), path,
                                    output_dir / f"{stem}_overlay.mp4", output_dir / f"{stem}_frames.csv",
                                    every=max(1, int(every)))
        except ValueError as error:
            return None, None, problem(f"Cannot read {Path(path).name} as a video: {error}")
        text = (f"**{summary.frames} frames** ({summary.width}x{summary.height} at {summary.frames_per_second:g} "
                f"frames/s), {summary.segmented_frames} segmented in {summary.seconds:.1f} s "
                f"({summary.frames / summary.seconds:.2f} frames/s on {runs_on}).")
        return str(summary.output_video), str(summary.output_csv), text

    with gr.Blocks(title="Attention U-Net polyp segmentation") as demo:
        gr.Markdown("# Attention U-Net: polyp segmentation in colonoscopy\nAn Attention U-Net (Oktay et al., 2018) on "
                    "a ConvNeXt-Tiny encoder, trained on Kvasir-SEG. Research use only: not a medical device.")
        with gr.Tab("Frame"):
            with gr.Row():
                with gr.Column():
                    # A file, not a `gr.Image`: an image component rejects an unreadable upload before our code can
                    # say what is wrong with it.
                    frame_input = gr.File(label="Colonoscopy frame", file_types=["image"], type="filepath")
                    threshold = gr.Slider(0.05, 0.95, value=default_threshold, step=0.05,
                                          label="Threshold (polyp probability)")
                    tta = gr.Checkbox(value=False, label="Flip test-time augmentation (4 passes)")
                    # Pictures, not file names: a click puts the frame into the input above.
                    examples = gr.Gallery([(str(path), example_caption(path)) for path in EXAMPLES],
                                          label="Examples (click one)", columns=3, allow_preview=False,
                                          elem_id="examples", format="png")
                    examples.select(pick_example, None, frame_input, api_name=False)
                with gr.Column():
                    summary = gr.Markdown(elem_id="frame-summary")
                    overlay = gr.Image(label="Overlay", elem_id="overlay", format="png")
                    probability = gr.Image(label="Polyp probability", format="png")
                    mask = gr.Image(label="Mask (255 = polyp)", image_mode="L", format="png")
                    gates = gr.Gallery(label="Attention gates", columns=4, format="png")
            frame_outputs = [overlay, probability, gates, mask, summary]
            for trigger in (frame_input.change, threshold.release, tta.change):
                trigger(on_frame, [frame_input, threshold, tta], frame_outputs, api_name=False)
            gr.Button("Segment", variant="primary").click(on_frame, [frame_input, threshold, tta], frame_outputs,
                                                           api_name="segment_frame")
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column():
                    video_input = gr.File(label="Colonoscopy video", file_types=sorted(VIDEO_EXTENSIONS))
                    every = gr.Number(value=1, precision=0, minimum=1, label="Segment every N-th frame")
                    video_threshold = gr.Slider(0.05, 0.95, value=default_threshold, step=0.05, label="Threshold")
                    video_tta = gr.Checkbox(value=False, label="Flip test-time augmentation")
                    run_video = gr.Button("Segment video", variant="primary")
                with gr.Column():
                    video_summary = gr.Markdown(elem_id="video-summary")
                    video_output = gr.Video(label="Overlay")
                    csv_output = gr.File(label="Per-frame CSV")
            run_video.click(on_video, [video_input, every, video_threshold, video_tta],
                            [video_output, csv_output, video_summary], api_name="segment_video")
    return demo


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.float32_matmul_precision:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    model, processor = load_model_and_processor(args.model, args.revision, args.trust_remote_code, args.device)
    segmenter = None
    if args.openvino is not None:
        segmenter = load_openvino_segmenter(args.openvino, processor, args.model)
    demo = build_demo(model, processor, args.device, segmenter)
    demo.queue().launch(server_name=args.server_name, server_port=args.server_port, show_error=True)


if __name__ == "__main__":
    main()
