"""Exported models called like the PyTorch model: `segmenter(pixel_values=..., output_attentions=...)` ->
`SemanticSegmenterOutput`, so that `segment_frames`, flip TTA and evaluation run on them unchanged.

- `OnnxSegmenter`: an `export_onnx.py` file (float32) run by ONNX Runtime;
- `OpenVinoSegmenter`: an `export_openvino.py` model (`.xml` + `.bin`, int8 or float32) run by OpenVINO.

Both carry what the scripts need besides the graph (threshold, presence threshold, labels, input convention) in the
file's metadata, as the strings `onnx_export.export_metadata` gives.
"""

import json
import re
from pathlib import Path

import torch
from transformers.modeling_outputs import SemanticSegmenterOutput

# Where an OpenVINO model keeps the metadata (its `rt_info`); ONNX files keep it in `metadata_props`.
OPENVINO_METADATA_SECTION = "polyp_segmentation"
OPENVINO_REQUIREMENT = "openvino"
NNCF_REQUIREMENT = "nncf"
EXPORT_OUTPUT = re.compile(r"logits|attention_\d+")


class MissingRuntimeError(ImportError):
    """An optional runtime (OpenVINO, NNCF) is not installed; the message names the package to install."""


def import_openvino():
    try:
        import openvino
    except ImportError as error:
        raise MissingRuntimeError(
            f"Running or writing an OpenVINO model needs the OpenVINO runtime: pip install {OPENVINO_REQUIREMENT} "
            f"({error})."
        ) from error
    return openvino


class _ExportedSegmenter:
    """What the scripts read off an export's metadata."""

    metadata: dict[str, str]

    @property
    def image_mean(self) -> list[float] | None:
        """The statistics the graph normalises with; `None` for exports that take normalised input (older ones)."""
        return json.loads(self.metadata["image_mean"]) if "image_mean" in self.metadata else None

    @property
    def threshold(self) -> float | None:
        return float(self.metadata["threshold"]) if "threshold" in self.metadata else None

    @property
    def presence_threshold(self) -> float | None:
        return float(self.metadata["presence_threshold"]) if "presence_threshold" in self.metadata else None

    def _output(self, outputs: dict, output_attentions: bool, path) -> SemanticSegmenterOutput:
        attentions = None
        if output_attentions:
            attentions = tuple(torch.from_numpy(outputs[name]) for name in self.output_names if name != "logits")
            if not attentions:
                raise ValueError(f"{path} has no attention map outputs; export it again.")
        return SemanticSegmenterOutput(logits=torch.from_numpy(outputs["logits"]), attentions=attentions)


class OnnxSegmenter(_ExportedSegmenter):
    """An ONNX Runtime session on the CPU."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        if "logits" not in self.output_names:
            raise ValueError(f"{path} has no `logits` output; export it with export_onnx.py.")

    def __call__(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> SemanticSegmenterOutput:
        names = self.output_names if output_attentions else ["logits"]
        outputs = dict(zip(names, self.session.run(names, {"pixel_values": pixel_values.cpu().numpy()})))
        return self._output(outputs, output_attentions, self.path)


class OpenVinoSegmenter(_ExportedSegmenter):
    """An OpenVINO model on the CPU, compiled once per input shape: a graph of fixed shape lets the CPU plugin pick
    its int8 kernels ahead of time, and a video or a folder of frames at the processor's size uses one shape.

    What is not int8 runs in float32: left to itself, the CPU plugin runs float layers in bf16 on CPUs that have it
    (AVX512_BF16, AMX) and in float32 elsewhere, so the same model would answer differently from machine to machine
    and differ from what export_openvino.py checked."""

    def __init__(self, path: str | Path, device: str = "CPU", config: dict | None = None):
        openvino = import_openvino()
        self.path, self.device = path, device
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", **(config or {})}
        self.core = openvino.Core()
        try:
            self.model = self.core.read_model(str(path))
        except RuntimeError as error:
            raise ValueError(f"{path}: not a readable OpenVINO model (an .xml with its .bin beside it): {error}") \
                from error
        # An output tensor has several names once OpenVINO fuses the ops around it; the export's is the one kept.
        self.output_names = [next((name for name in sorted(output.get_names()) if EXPORT_OUTPUT.fullmatch(name)),
                                  output.get_any_name()) for output in self.model.outputs]
        if "logits" not in self.output_names:
            raise ValueError(f"{path} has no `logits` output; export it with export_openvino.py.")
        self.metadata = {}
        if self.model.has_rt_info([OPENVINO_METADATA_SECTION]):
            section = self.model.get_rt_info([OPENVINO_METADATA_SECTION]).astype(dict)
            self.metadata = {key: value.astype(str) for key, value in section.items()}
        self.input_name = self.model.inputs[0].get_any_name()
        self.compiled_models = {}

    def compiled_for(self, shape: tuple[int, ...]):
        if shape not in self.compiled_models:
            model = self.model.clone()
            model.reshape({self.input_name: list(shape)})
            self.compiled_models[shape] = self.core.compile_model(model, self.device, self.config)
        return self.compiled_models[shape]

    def __call__(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> SemanticSegmenterOutput:
        compiled = self.compiled_for(tuple(pixel_values.shape))
        results = compiled({self.input_name: pixel_values.cpu().contiguous().numpy()}).to_tuple()
        outputs = dict(zip(self.output_names, results))
        return self._output(outputs, output_attentions, self.path)


def load_openvino_segmenter(path: str | Path, processor, source: str | Path) -> OpenVinoSegmenter:
    """The OpenVINO export at `path`, to run in place of the model loaded from `source` with its `processor`; refused
    (`ValueError`) unless the two agree on who normalises the pixels."""
    from polyp_segmentation.loading import check_input_convention

    segmenter = OpenVinoSegmenter(path)
    check_input_convention(segmenter, processor, f"--openvino {path} with the processor of {source}")
    return segmenter
