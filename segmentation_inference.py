"""What the scripts share to run a saved Attention U-Net: loading it safely, flip TTA, and drawing masks and gate maps.

`load_model_and_processor` is the one way the scripts load a model. A local folder loads as it is; a Hub id runs that
repository's Python (its configuration, model and processor files), so it is refused unless the user passed
`--trust_remote_code`, before anything is downloaded. The weights are checked before transformers reads them: only
safetensors files, readable, holding exactly the tensors the config builds, each with its shape; an error names the
file and the tensor.
"""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.utils import cached_file

OVERLAY_COLOR = np.array([0, 255, 0], dtype=np.float32)
OVERLAY_ALPHA = 0.35
HEATMAP_COLORMAP = "jet"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


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


def check_checkpoint_files(checkpoint_files: list[str], model: torch.nn.Module, ignore_mismatched_sizes: bool = False) -> None:
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


def load_model_and_processor(name_or_path: str | Path, revision: str | None = None, trust_remote_code: bool = False,
                             device: str | torch.device = "cpu"):
    """The model in eval mode on `device`, and its image processor."""
    model = load_model(name_or_path, revision, trust_remote_code).to(device).eval()
    return model, load_processor(name_or_path, revision, trust_remote_code)


def predict_logits(model, pixel_values: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """`(B, 3, H, W)` -> `(B, 1, H, W)` logits; with `tta`, the mean over the input and its horizontal, vertical and
    double flips (each prediction flipped back)."""
    if not tta:
        return model(pixel_values=pixel_values).logits
    flips = [(), (-1,), (-2,), (-2, -1)]
    logits = [model(pixel_values=pixel_values.flip(dims) if dims else pixel_values).logits for dims in flips]
    return torch.stack([lg.flip(dims) if dims else lg for lg, dims in zip(logits, flips)]).mean(0)


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


def heat_map(coefficients: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A `(1, h, w)` map in [0, 1] (a gate's coefficients, or the polyp probability), resized to `size`, as an
    `(H, W, 3)` uint8 heat map on a fixed [0, 1] scale."""
    import matplotlib

    resized = F.interpolate(coefficients[None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    colors = matplotlib.colormaps[HEATMAP_COLORMAP](resized.clamp(0, 1).numpy())[..., :3]
    return (colors * 255).round().astype(np.uint8)
