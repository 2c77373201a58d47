"""Attention U-Net configuration."""

import math
import re

import timm
import transformers
from transformers import PretrainedConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MINIMUM_TRANSFORMERS = (4, 57)
if tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2]) < MINIMUM_TRANSFORMERS:
    raise ImportError(
        f"This model's code needs transformers >= {'.'.join(map(str, MINIMUM_TRANSFORMERS))}, but "
        f"{transformers.__version__} is installed: pip install -U 'transformers>=4.57'."
    )


class AttentionUNetConfig(PretrainedConfig):
    r"""
    Configuration of an [`AttentionUNetForSemanticSegmentation`]: an Attention U-Net (Oktay et al., 2018) decoder with
    an attention gate on every skip connection, on top of a timm encoder.

    Args:
        encoder_name (`str`, *optional*, defaults to `"convnext_tiny"`):
            Name of the timm model used as the encoder (built with `features_only=True`). Any timm model that supports
            `features_only` works; its stage channels and strides are read from timm's `feature_info`.
        decoder_channels (`list[int]`, *optional*, defaults to `[256, 128, 64, 32, 16]`):
            Output channels of each decoder stage, coarsest first. Each stage upsamples by 2, so there must be one
            stage per halving of resolution in the encoder (5 for an encoder with a total stride of 32).
        use_attention_gates (`bool`, *optional*, defaults to `True`):
            Whether skip connections pass through attention gates. `False` gives a plain U-Net (for ablations).
        attention_channels_ratio (`float`, *optional*, defaults to 0.5):
            Channels of a gate's intermediate map, as a fraction of its skip connection's channels.
        attention_gate_output_transform (`bool`, *optional*, defaults to `True`):
            Whether each gated skip passes through the paper's output transform (1x1 convolution and BatchNorm) before
            it joins the decoder. The v1 weights were trained without it (`False`).
        decoder_upsampling (`str`, *optional*, defaults to `"nearest"`):
            How each decoder stage doubles its input's resolution: `"nearest"` upsamples the whole coarse feature
            (as smp's U-Net), which the fit probe showed to learn faster; `"transposed_conv"` is a learned 2x2
            transposed convolution to the stage's output channels (the v1 weights).
        num_channels (`int`, *optional*, defaults to 3):
            Number of input image channels.
        image_mean (`list[float]`, *optional*, defaults to ImageNet's `[0.485, 0.456, 0.406]`):
            Per-channel mean the model subtracts from `pixel_values` at the start of `forward`, which therefore takes
            RGB values in [0, 1] (as `torchvision.transforms.functional.to_tensor` gives them). `None` (with
            `image_std`): the model takes already-normalised values, the convention of every config saved before these
            fields existed, which is what a saved config without them loads as.
        image_std (`list[float]`, *optional*, defaults to ImageNet's `[0.229, 0.224, 0.225]`):
            Per-channel standard deviation the model divides by after subtracting `image_mean`. Set both or neither;
            with `num_channels` other than 3, the defaults are the average of ImageNet's, for every channel.
        num_output_channels (`int`, *optional*, defaults to 1):
            Channels of the logits. Must be 1: the model segments one class, its sigmoid the foreground probability.
        loss_alpha (`float`, *optional*, defaults to 0.5):
            Loss mix: `loss_alpha * BCE + (1 - loss_alpha) * Dice`. Must lie in [0, 1].
        dice_on_empty_masks (`bool`, *optional*, defaults to `True`):
            Whether the loss's per-image soft Dice also covers images whose mask is empty (polyp-free frames), where
            it pushes the whole image's probabilities towards zero; `False` averages the Dice over the images with a
            polyp only, and polyp-free images count through the BCE alone.
        threshold (`float`, *optional*, defaults to 0.5):
            Probability above which a pixel is foreground. Must lie in (0, 1). The one source of the threshold: the
            pipeline, `evaluate_model.py` and `predict.py` all read it from here.
        presence_threshold (`float`, *optional*):
            Frame-level decision: a frame whose polyp score (its largest polyp probability) is below this is judged
            polyp-free, and post-processing returns an empty mask for it. Chosen on validation frames with and
            without polyps; `None` (or a value at or below `threshold`) judges a frame to hold a polyp when any pixel
            is above `threshold`.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth rate passed to the timm encoder.
        use_auxiliary_heads (`bool`, *optional*, defaults to `False`):
            Deep supervision: a 1x1 head on every decoder stage but the last, whose logits (upsampled to the input)
            add to the loss when labels are given. They change no output; weights saved without them load into a
            model with them, which initialises them.
        auxiliary_loss_weight (`float`, *optional*, defaults to 0.4):
            Weight of the auxiliary heads' mean loss in the total loss. Must be >= 0.
        id2label (`dict[int, str]`, *optional*, defaults to `{0: "background", 1: "polyp"}`):
            Names of the mask's values.

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModel

    >>> config = AutoConfig.from_pretrained("path/to/this/repo", trust_remote_code=True)
    >>> model = AutoModel.from_config(config, trust_remote_code=True)
    ```"""

    model_type = "attention_unet"

    def __init__(
        self,
        encoder_name: str = "convnext_tiny",
        decoder_channels: list[int] | tuple[int, ...] = (256, 128, 64, 32, 16),
        use_attention_gates: bool = True,
        attention_channels_ratio: float = 0.5,
        attention_gate_output_transform: bool = True,
        decoder_upsampling: str = "nearest",
        num_channels: int = 3,
        image_mean: list[float] | tuple[float, ...] | None = IMAGENET_DEFAULT_MEAN,
        image_std: list[float] | tuple[float, ...] | None = IMAGENET_DEFAULT_STD,
        num_output_channels: int = 1,
        loss_alpha: float = 0.5,
        dice_on_empty_masks: bool = True,
        threshold: float = 0.5,
        presence_threshold: float | None = None,
        drop_path_rate: float = 0.0,
        use_auxiliary_heads: bool = False,
        auxiliary_loss_weight: float = 0.4,
        **kwargs,
    ):
        # A classic `__init__`, not a `@strict` dataclass: transformers 4.x and 5.0 configs are not dataclasses, and
        # every release since accepts a config subclass with its own `__init__`.
        self.encoder_name = encoder_name
        self.decoder_channels = decoder_channels
        self.use_attention_gates = use_attention_gates
        self.attention_channels_ratio = attention_channels_ratio
        self.attention_gate_output_transform = attention_gate_output_transform
        self.decoder_upsampling = decoder_upsampling
        self.num_channels = num_channels
        if num_channels != 3 and image_mean is IMAGENET_DEFAULT_MEAN and image_std is IMAGENET_DEFAULT_STD:
            # timm's rule for an ImageNet model with other than three input channels: the channels' average.
            image_mean = [sum(IMAGENET_DEFAULT_MEAN) / 3] * num_channels
            image_std = [sum(IMAGENET_DEFAULT_STD) / 3] * num_channels
        self.image_mean = image_mean
        self.image_std = image_std
        self.num_output_channels = num_output_channels
        self.loss_alpha = loss_alpha
        self.dice_on_empty_masks = dice_on_empty_masks
        self.threshold = threshold
        self.presence_threshold = presence_threshold
        self.drop_path_rate = drop_path_rate
        self.use_auxiliary_heads = use_auxiliary_heads
        self.auxiliary_loss_weight = auxiliary_loss_weight
        if kwargs.get("id2label") is None and kwargs.get("num_labels") is None:
            kwargs["id2label"] = {0: "background", 1: "polyp"}
            kwargs["label2id"] = {"background": 0, "polyp": 1}
        # `pipeline("image-segmentation", model=..., trust_remote_code=True)` builds this repository's pipeline.
        kwargs.setdefault("custom_pipelines", {"image-segmentation": {
            "impl": "image_processing_attention_unet.AttentionUNetSegmentationPipeline",
            "pt": ["AutoModelForSemanticSegmentation"], "tf": [], "type": "image",
        }})
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # A saved config without the normalisation fields predates them: its model takes normalised input. Only a new
        # config (built in code) gets the ImageNet defaults and normalises inside.
        config_dict = {"image_mean": None, "image_std": None, **config_dict}
        return super().from_dict(config_dict, **kwargs)

    @property
    def normalizes_inputs(self) -> bool:
        """Whether the model normalises its `pixel_values` itself (they are then RGB in [0, 1])."""
        return self.image_mean is not None

    def __setattr__(self, key, value):
        # Every field is checked as it is set, in `__init__` and after it (`from_pretrained(..., **overrides)` and
        # `update_from_string` set fields one by one), so a bad value fails when the config is built, naming the field.
        if key in _FIELD_CHECKS:
            value = _FIELD_CHECKS[key](value)
        super().__setattr__(key, value)


def _check_encoder_name(value: str) -> str:
    if not timm.is_model(value):
        raise ValueError(f"`encoder_name`={value!r} is not a model timm knows (see `timm.list_models()`).")
    return value


def _check_decoder_channels(value) -> list[int]:
    value = list(value)
    if len(value) == 0:
        raise ValueError("`decoder_channels` is empty: the decoder needs at least one stage.")
    if any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in value):
        raise ValueError(f"`decoder_channels` must hold positive integers, got {value}.")
    return value


def _check_in(name: str, choices: tuple[str, ...]):
    def check(value):
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
        return value

    return check


def _check_range(name: str, low: float, high: float, low_open: bool, high_open: bool):
    def check(value):
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if isinstance(value, bool) or not isinstance(value, (int, float)) or too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"`{name}` must lie in {interval}, got {value!r}.")
        return value

    return check


def _optional(check):
    return lambda value: None if value is None else check(value)


def _check_positive_int(name: str):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        return value

    return check


def _check_channel_statistics(name: str, positive: bool):
    def check(value):
        if value is None:
            return None
        values = list(value) if isinstance(value, (list, tuple)) else None
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                             or (positive and v <= 0) for v in values):
            kind = "positive numbers" if positive else "finite numbers"
            raise ValueError(f"`{name}` must be None or a list of {kind}, one per input channel, got {value!r}.")
        return [float(v) for v in values]

    return check


def _check_num_output_channels(value):
    if value != 1:
        raise ValueError(
            f"`num_output_channels` must be 1, got {value!r}: the model segments one class (its sigmoid is the polyp "
            "probability), and its loss, metrics and post-processing are binary."
        )
    return value


DECODER_UPSAMPLING_MODES = ("nearest", "transposed_conv")
_FIELD_CHECKS = {
    "encoder_name": _check_encoder_name,
    "decoder_channels": _check_decoder_channels,
    "decoder_upsampling": _check_in("decoder_upsampling", DECODER_UPSAMPLING_MODES),
    "attention_channels_ratio": _check_range("attention_channels_ratio", 0.0, 1.0, True, False),
    "num_channels": _check_positive_int("num_channels"),
    "image_mean": _check_channel_statistics("image_mean", positive=False),
    "image_std": _check_channel_statistics("image_std", positive=True),
    "num_output_channels": _check_num_output_channels,
    "loss_alpha": _check_range("loss_alpha", 0.0, 1.0, False, False),
    "threshold": _check_range("threshold", 0.0, 1.0, True, True),
    "presence_threshold": _optional(_check_range("presence_threshold", 0.0, 1.0, True, True)),
    "drop_path_rate": _check_range("drop_path_rate", 0.0, 1.0, False, True),
    "auxiliary_loss_weight": _check_range("auxiliary_loss_weight", 0.0, float("inf"), False, True),
}

__all__ = ["AttentionUNetConfig"]
