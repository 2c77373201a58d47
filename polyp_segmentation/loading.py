"""Loading a saved Attention U-Net safely: `load_model_and_processor` is the one way the scripts load a model. A local
folder loads as it is; a Hub id runs that repository's Python (its configuration, model and processor files), so it
is refused unless the user passed `--trust_remote_code`, before anything is downloaded. The weights are checked before
transformers reads them: only safetensors files, readable, each tensor with the shape the config gives it; an error
names the file and the tensor. Missing or left-over tensors are an error of the model's own `from_pretrained`."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.utils import cached_file

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


def check_checkpoint_files(checkpoint_files: list[str], model: nn.Module, ignore_mismatched_sizes: bool = False) -> None:
    """Raises a `ValueError` naming the file (and the tensor) unless `checkpoint_files` are readable safetensors files
    whose tensors have the shapes `model`'s config gives them: what transformers would report without the file's
    name. Missing and left-over tensors are the model's own `from_pretrained`'s check (one listing, also for users
    who call it directly)."""
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"{path}: weights are only loaded from safetensors files, never from pickles.")
        try:
            with safe_open(path, framework="pt") as weights:
                shapes = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error}).") from error
        for name, shape in shapes.items():
            if name in expected and shape != expected[name] and not ignore_mismatched_sizes:
                raise ValueError(f"{path}: tensor {name} has shape {shape} but the config needs {expected[name]}.")


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
    model_normalizes = getattr(config, "image_mean", None) is not None  # configs saved before it have none
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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
