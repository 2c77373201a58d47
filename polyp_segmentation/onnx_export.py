"""Exporting the model to ONNX (the dynamo exporter) with dynamic batch, height and width."""

import json
import os
from pathlib import Path

import torch
from torch import nn

# The dynamo exporter's ONNX functions (torchlib) are written for opset 18; other opsets go through a version converter.
DEFAULT_OPSET = 18
# Deliberately not multiples of 32, so that the traced graph keeps the model's padding as a computation on the input
# shape; batch 2 so that the batch dimension is not specialised as 1.
EXAMPLE_SHAPE = (2, 3, 250, 330)
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


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
    if getattr(config, "image_mean", None) is None:  # configs saved before the model normalised its inputs
        return {"pixel_values": "normalised as the model's image processor does (do_normalize true)"}
    return {"pixel_values": "RGB in [0, 1]; the graph normalises with image_mean and image_std",
            "image_mean": json.dumps(config.image_mean), "image_std": json.dumps(config.image_std)}


def export_metadata(model, num_gates: int, source: str | None = None) -> dict[str, str]:
    """What an export carries besides its graph, as strings: threshold, presence threshold, labels, input convention,
    number of gate maps and the model it came from (ONNX `metadata_props`, OpenVINO `rt_info`)."""
    return {
        "threshold": str(model.config.threshold),
        **({"presence_threshold": str(model.config.presence_threshold)}
           if getattr(model.config, "presence_threshold", None) is not None else {}),
        "id2label": json.dumps({str(k): v for k, v in model.config.id2label.items()}),
        **onnx_input_metadata(model.config),
        "num_attention_maps": str(num_gates),
        "source_model": str(source or model.config.name_or_path or ""),
    }


def export_model(model, output: str | os.PathLike, opset: int = DEFAULT_OPSET, source: str | None = None) -> Path:
    """Exports an `AttentionUNetForSemanticSegmentation` (logits and gate maps, dynamic batch, height and width)."""
    model = model.eval().float().cpu()
    example = torch.rand(*EXAMPLE_SHAPE[:1], model.config.num_channels, *EXAMPLE_SHAPE[2:])
    with torch.no_grad():
        num_gates = len(model(pixel_values=example[:1], output_attentions=True).attentions)
    output_names = ["logits"] + [f"attention_{i}" for i in range(num_gates)]
    return export_to_onnx(OnnxExportWrapper(model), example, output, output_names, opset,
                          metadata=export_metadata(model, num_gates, source))
