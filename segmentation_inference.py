"""What the scripts and the demo share to run a saved Attention U-Net: loading it safely, segmenting frames (flip TTA
included) and videos, drawing masks, probabilities and gate maps, and exporting to ONNX.

`load_model_and_processor` is the one way the scripts load a model. A local folder loads as it is; a Hub id runs that
repository's Python (its configuration, model and processor files), so it is refused unless the user passed
`--trust_remote_code`, before anything is downloaded. The weights are checked before transformers reads them: only
safetensors files, readable, holding exactly the tensors the config builds, each with its shape; an error names the
file and the tensor.
"""

import csv
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
import torch.nn.functional as F
from torch import nn
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import cached_file

OVERLAY_COLOR = np.array([0, 255, 0], dtype=np.float32)
OVERLAY_ALPHA = 0.35
HEATMAP_COLORMAP = "jet"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".mov"}
VIDEO_CSV_FIELDS = ("frame_index", "time_seconds", "polyp_present", "polyp_score", "polyp_area_fraction",
                    "mean_probability")
# The dynamo exporter's ONNX functions (torchlib) are written for opset 18; other opsets go through a version converter.
DEFAULT_OPSET = 18
# Deliberately not multiples of 32, so that the traced graph keeps the model's padding as a computation on the input
# shape; batch 2 so that the batch dimension is not specialised as 1.
EXAMPLE_SHAPE = (2, 3, 250, 330)
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


class UntrustedRemoteCodeError(ValueError):
    """A Hub model was named without `--trust_remote_code`."""


def is_local(name_or_path: str | Path) -> bool:
    return Path(name_or_path).is_dir()


def check_remote_code_allowed(name_or_path: str | Path, trust_remote_code: bool, flag: str = "--model") -> None:
    """Raises `UntrustedRemoteCodeError` unless loading `name_or_path` runs only code the user chose to run: a local
    folder whose code is its own, or anything at all with `trust_remote_code`."""
    if trust_remote_code:
        return
    if not is_local(name_or_path):
        raise UntrustedRemoteCodeError(
            f"{flag} {name_or_path}: not a local folder, so it names a Hub repository, and loading it runs that "
            "repository's Python code (its configuration, model and image processor files). Review that code, then "
            "pass --trust_remote_code to allow it."
        )
    config_path = Path(name_or_path) / "config.json"
    if config_path.is_file():
        auto_map = json.loads(config_path.read_text()).get("auto_map", {})
        elsewhere = sorted({ref for ref in auto_map.values() if isinstance(ref, str) and "--" in ref})
        if elsewhere:
            raise UntrustedRemoteCodeError(
                f"{config_path}: its auto_map loads code from other repositories ({', '.join(elsewhere)}). Review "
                "that code, then pass --trust_remote_code to allow it."
            )


def add_float32_matmul_precision_argument(parser) -> None:
    """`--float32_matmul_precision`, as train_accelerate.py, evaluate.py, predict.py and app.py take it."""
    parser.add_argument(
        "--float32_matmul_precision", choices=("highest", "high", "medium"), default=None,
        help="torch.set_float32_matmul_precision for the run (default: PyTorch's, 'highest'). 'high' and 'medium' "
             "allow TF32 / bf16 inside float32 matrix products where the hardware has them; 'medium' also sends a "
             "CPU's float32 matrix products through oneDNN, 2.3x faster than MKL on AVX-512 AMD CPUs and still "
             "float32 there (README: Training speed on a CPU).")


def check_remote_code_arguments(parser, trust_remote_code: bool, sources: dict[str, str | None]) -> None:
    """For a script's `parse_args`: `parser.error` (exit status 2, nothing downloaded or run) for the first of
    `sources` (`{"--flag": value}`, `None` values skipped) that would run code the user did not allow."""
    for flag, value in sources.items():
        if value is not None:
            try:
                check_remote_code_allowed(value, trust_remote_code, flag)
            except UntrustedRemoteCodeError as error:
                parser.error(str(error))


def resolve_weight_files(name_or_path: str | Path, revision: str | None = None) -> list[str]:
    """The weight files `from_pretrained(..., use_safetensors=True)` would read (downloaded for a Hub id), refusing
    anything but safetensors, also when `config.json` redirects the weights (`transformers_weights`) to a pickle."""
    config_file = cached_file(str(name_or_path), "config.json", revision=revision)
    redirect = json.loads(Path(config_file).read_text()).get("transformers_weights")
    if redirect is not None and not str(redirect).endswith(".safetensors"):
        raise ValueError(
            f"{config_file}: `transformers_weights` points at {redirect}, which is not a safetensors file; weights "
            "are only loaded from safetensors files, never from pickles."
        )
    weights_name = redirect or WEIGHTS_NAME
    try:
        return [cached_file(str(name_or_path), weights_name, revision=revision)]
    except OSError as single_file_error:
        try:
            index_file = cached_file(str(name_or_path), WEIGHTS_INDEX_NAME, revision=revision)
        except OSError:
            raise ValueError(
                f"{name_or_path}: no {weights_name} (nor {WEIGHTS_INDEX_NAME}) could be read ({single_file_error}); "
                "weights are only loaded from safetensors files, never from pickles."
            ) from single_file_error
    shards = sorted(set(json.loads(Path(index_file).read_text())["weight_map"].values()))
    return [cached_file(str(name_or_path), shard, revision=revision) for shard in shards]


def check_checkpoint_files(checkpoint_files: list[str], model: nn.Module, ignore_mismatched_sizes: bool = False) -> None:
    """Raises a `ValueError` naming the file (and the tensor) unless `checkpoint_files` are readable safetensors files
    holding exactly the tensors of `model`'s state dict, each with the shape the model's config gives it."""
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    found = set()
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path}: weights are only loaded from safetensors files, never from pickles.")
        try:
            with safe_open(path, framework="pt") as weights:
                shapes = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error}).") from error
        for name, shape in shapes.items():
            if name not in expected:
                raise ValueError(f"{path}: tensor {name} is not part of the model this config builds.")
            if shape != expected[name] and not ignore_mismatched_sizes:
                raise ValueError(f"{path}: tensor {name} has shape {shape} but the config needs {expected[name]}.")
        found.update(shapes)
    missing = [name for name in expected if name not in found]
    if missing:
        where = checkpoint_files[0] if len(checkpoint_files) == 1 else str(Path(checkpoint_files[0]).parent)
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{where}: missing tensor(s) the config needs: {listed}.")


def load_model(
    name_or_path: str | Path,
    revision: str | None = None,
    trust_remote_code: bool = False,
    config=None,
    flag: str = "--model",
    **kwargs,
):
    """`AutoModel.from_pretrained` for the scripts: remote code only on request, weights checked first (see above)."""
    check_remote_code_allowed(name_or_path, trust_remote_code, flag)
    if config is None:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=True)
    files = resolve_weight_files(name_or_path, revision)
    with torch.device("meta"):  # the shapes the config builds, without allocating or initialising anything
        skeleton = AutoModel.from_config(config, trust_remote_code=True)
    check_checkpoint_files(files, skeleton, kwargs.get("ignore_mismatched_sizes", False))
    return AutoModel.from_pretrained(
        name_or_path, revision=revision, config=config, trust_remote_code=True, use_safetensors=True, **kwargs
    )


def load_processor(name_or_path: str | Path, revision: str | None = None, trust_remote_code: bool = False,
                   flag: str = "--model"):
    check_remote_code_allowed(name_or_path, trust_remote_code, flag)
    return AutoImageProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=True)


def check_input_convention(config, processor, where: str) -> None:
    """Raises `ValueError` unless exactly one of `processor` and the model normalises the pixel values. `config` is
    the model's config (or anything with its `image_mean`: an ONNX export's metadata); `where` names their source."""
    model_normalizes = config.image_mean is not None
    if model_normalizes and processor.do_normalize:
        raise ValueError(
            f"{where}: the image processor normalises (do_normalize true) and so does the model (config image_mean "
            f"{config.image_mean}): the input would be normalised twice. Set the processor's do_normalize to false."
        )
    if not model_normalizes and not processor.do_normalize:
        raise ValueError(
            f"{where}: neither the image processor (do_normalize false) nor the model (config image_mean null) "
            "normalises the pixel values. Set the config's image_mean and image_std, or the processor's do_normalize."
        )


def load_model_and_processor(name_or_path: str | Path, revision: str | None = None, trust_remote_code: bool = False,
                             device: str | torch.device = "cpu"):
    """The model in eval mode on `device`, and its image processor."""
    model = load_model(name_or_path, revision, trust_remote_code).to(device).eval()
    processor = load_processor(name_or_path, revision, trust_remote_code)
    check_input_convention(model.config, processor, str(name_or_path))
    return model, processor


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
        outputs = SemanticSegmenterOutput(logits=logits)
        masks = processor.post_process_semantic_segmentation(
            outputs, target_sizes=sizes, threshold=threshold, presence_threshold=presence_threshold
        )
        scores = processor.post_process_polyp_scores(outputs).tolist()
        probabilities = [
            F.interpolate(frame_logits[None], size=size, mode="bilinear", align_corners=False)[0, 0].sigmoid()
            for frame_logits, size in zip(logits, sizes)
        ]
    return [
        FrameSegmentation(mask.numpy().astype(bool), probability.numpy(), score, is_polyp_present(score, threshold,
                                                                                                 presence_threshold),
                          [gate[index] for gate in gate_maps] if gate_maps is not None else None)
        for index, (mask, probability, score) in enumerate(zip(masks, probabilities, scores))
    ]


def is_polyp_present(score: float, threshold: float, presence_threshold: float | None) -> bool:
    """The frame-level decision: the polyp score reaches `presence_threshold`, and some pixel passes `threshold`."""
    return score > threshold and (presence_threshold is None or score >= presence_threshold)


@dataclass
class VideoSummary:
    frames: int
    segmented_frames: int
    frames_per_second: float  # the source's rate
    width: int
    height: int
    seconds: float  # wall time of the whole pass
    output_video: Path
    output_csv: Path


def read_video(path: str | Path) -> Iterator:
    """Decoded frames of the first video stream of `path`, as PyAV `VideoFrame`s. Raises `ValueError` naming the
    file when it is not a readable video."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise ValueError(f"{path}: not a readable video ({error}).") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: holds no video stream.")
        try:
            yield from container.decode(video=0)
        except av.error.FFmpegError as error:
            raise ValueError(f"{path}: the video is damaged ({error}).") from error


def segment_video(
    segment: Callable[[list[np.ndarray]], list[FrameSegmentation]],
    path: str | Path,
    output_video: str | Path,
    output_csv: str | Path,
    every: int = 1,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> VideoSummary:
    """Segments every `every`-th frame of the video at `path` with `segment` (frames -> results), and writes the
    overlaid video (the source's frame rate and size; frames in between show the latest mask) and a CSV with one row
    per segmented frame: `VIDEO_CSV_FIELDS`. `progress` is called with the number of frames done since its last call.
    Raises `ValueError` naming the file for an unreadable or damaged video; the partial outputs are then removed."""
    import av

    output_video, output_csv = Path(output_video), Path(output_csv)
    start = time.perf_counter()
    frames_read = segmented = 0
    writer = stream = rate = None
    try:
        with open(output_csv, "w", newline="") as csv_file:
            rows = csv.writer(csv_file)
            rows.writerow(VIDEO_CSV_FIELDS)
            pending: list[tuple[int, float, np.ndarray]] = []
            latest_mask = None

            def flush() -> None:
                nonlocal latest_mask, segmented
                to_segment = [(index, seconds, rgb) for index, seconds, rgb in pending if index % every == 0]
                results = iter(segment([rgb for _, _, rgb in to_segment]) if to_segment else [])
                for index, seconds, rgb in pending:
                    if index % every == 0:
                        result = next(results)
                        latest_mask = result.mask
                        rows.writerow([index, f"{seconds:.6f}", int(result.present), f"{result.score:.6f}",
                                       f"{result.area_fraction:.6f}", f"{float(result.probability.mean()):.6f}"])
                        segmented += 1
                    shown = overlay_mask(rgb, latest_mask) if latest_mask is not None else rgb
                    for packet in stream.encode(av.VideoFrame.from_ndarray(shown, format="rgb24")):
                        writer.mux(packet)
                if progress is not None and pending:
                    progress(len(pending))
                pending.clear()

            for frame in read_video(path):
                if writer is None:
                    writer, stream, rate = _open_video_writer(output_video, path, frame)
                seconds = float(frame.time) if frame.time is not None else frames_read / float(rate)
                pending.append((frames_read, seconds, frame.to_ndarray(format="rgb24")))
                frames_read += 1
                if len(pending) >= batch_size * every:
                    flush()
            if writer is None:
                raise ValueError(f"{path}: holds no decodable frame.")
            flush()
            for packet in stream.encode():
                writer.mux(packet)
    except Exception:
        if writer is not None:
            writer.close()
            writer = None
        output_video.unlink(missing_ok=True)
        output_csv.unlink(missing_ok=True)
        raise
    finally:
        if writer is not None:
            writer.close()
    return VideoSummary(frames_read, segmented, float(rate), stream.width, stream.height,
                        time.perf_counter() - start, output_video, output_csv)


def _open_video_writer(output_video: Path, source_path, first_frame):
    """An H.264 writer at the source's rate and the first frame's size (yuv444p when a side is odd, which 4:2:0
    cannot hold)."""
    import av

    with av.open(str(source_path)) as source:
        rate = source.streams.video[0].average_rate or source.streams.video[0].guessed_rate or 25
    writer = av.open(str(output_video), "w")
    stream = writer.add_stream("libx264", rate=rate)
    stream.width, stream.height = first_frame.width, first_frame.height
    stream.pix_fmt = "yuv420p" if first_frame.width % 2 == 0 and first_frame.height % 2 == 0 else "yuv444p"
    stream.options = {"crf": "18"}
    return writer, stream, rate


def overlay_mask(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`(H, W, 3)` uint8 frame and `(H, W)` bool mask -> the frame with the mask filled translucently and outlined (a
    line about 0.5% of the image's side)."""
    overlay = frame.astype(np.float32)
    overlay[mask] = (1.0 - OVERLAY_ALPHA) * overlay[mask] + OVERLAY_ALPHA * OVERLAY_COLOR
    thickness = max(1, round(min(mask.shape) / 200))
    eroded = PIL.Image.fromarray(mask.astype(np.uint8) * 255).filter(PIL.ImageFilter.MinFilter(2 * thickness + 1))
    outline = mask & ~(np.asarray(eroded) > 0)
    overlay[outline] = OVERLAY_COLOR
    return overlay.round().astype(np.uint8)


def heat_map(coefficients: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A `(1, h, w)` map in [0, 1] (a gate's coefficients, or the polyp probability), resized to `size`, as an
    `(H, W, 3)` uint8 heat map on a fixed [0, 1] scale."""
    import matplotlib

    coefficients = torch.as_tensor(coefficients)[None].float()
    resized = F.interpolate(coefficients, size=size, mode="bilinear", align_corners=False)[0, 0]
    colors = matplotlib.colormaps[HEATMAP_COLORMAP](resized.clamp(0, 1).numpy())[..., :3]
    return (colors * 255).round().astype(np.uint8)


class OnnxExportWrapper(nn.Module):
    """`pixel_values` -> `(logits, attention_0, ..., attention_{n-1})`, the flat outputs an ONNX graph needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values, output_attentions=True, return_dict=True)
        return (outputs.logits, *outputs.attentions)


def export_to_onnx(
    module: nn.Module,
    example: torch.Tensor,
    output: str | os.PathLike,
    output_names: list[str],
    opset: int = DEFAULT_OPSET,
    dynamic_axes: dict[int, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Exports `module(pixel_values)` with the dynamo exporter (`torch.export`) to one self-contained ONNX file.

    `dynamic_axes` maps the input's dynamic dimensions to names (default: batch, height and width); `metadata` goes
    into the file's `metadata_props`.
    """
    module = module.eval()
    dynamic_axes = DYNAMIC_AXES if dynamic_axes is None else dynamic_axes
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=output_names,
            # Names (rather than `Dim`s) become `Dim.DYNAMIC` and name the ONNX graph's input dimensions. A tuple, as
            # the module's own argument may have another name than `pixel_values`.
            dynamic_shapes=(dict(dynamic_axes),),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = value
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    program.save(output, external_data=False)
    return output


def onnx_input_metadata(config) -> dict[str, str]:
    """What an export's `pixel_values` are, for the file's metadata: RGB in [0, 1] that the graph normalises with the
    `image_mean` / `image_std` it records, or (models whose config has none) values already normalised."""
    if config.image_mean is None:
        return {"pixel_values": "normalised as the model's image processor does (do_normalize true)"}
    return {"pixel_values": "RGB in [0, 1]; the graph normalises with image_mean and image_std",
            "image_mean": json.dumps(config.image_mean), "image_std": json.dumps(config.image_std)}


def export_model(model, output: str | os.PathLike, opset: int = DEFAULT_OPSET, source: str | None = None) -> Path:
    """Exports an `AttentionUNetForSemanticSegmentation` (logits and gate maps, dynamic batch, height and width)."""
    model = model.eval().float().cpu()
    example = torch.rand(*EXAMPLE_SHAPE[:1], model.config.num_channels, *EXAMPLE_SHAPE[2:])
    with torch.no_grad():
        num_gates = len(model(pixel_values=example[:1], output_attentions=True).attentions)
    metadata = {
        "threshold": str(model.config.threshold),
        **({"presence_threshold": str(model.config.presence_threshold)}
           if model.config.presence_threshold is not None else {}),
        "id2label": json.dumps({str(k): v for k, v in model.config.id2label.items()}),
        "image_size": str(model.config.image_size),
        **onnx_input_metadata(model.config),
        "num_attention_maps": str(num_gates),
        "source_model": str(source or model.config.name_or_path or ""),
    }
    output_names = ["logits"] + [f"attention_{i}" for i in range(num_gates)]
    return export_to_onnx(OnnxExportWrapper(model), example, output, output_names, opset, metadata=metadata)
