"""Attention U-Net configuration."""

import timm
from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig


@strict
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
        image_size (`int`, *optional*, defaults to 256):
            Side of the square images the model is trained at (inputs of other sizes are padded, not rejected).
        num_output_channels (`int`, *optional*, defaults to 1):
            Channels of the logits. One channel for binary segmentation: its sigmoid is the foreground probability.
        loss_alpha (`float`, *optional*, defaults to 0.5):
            Loss mix: `loss_alpha * BCE + (1 - loss_alpha) * Dice`. Must lie in [0, 1].
        threshold (`float`, *optional*, defaults to 0.5):
            Probability above which a pixel is foreground. Must lie in (0, 1).
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth rate passed to the timm encoder.
        id2label (`dict[int, str]`, *optional*, defaults to `{0: "background", 1: "polyp"}`):
            Names of the mask's values.

    Example:

    ```python
    >>> from transformers import AutoConfig, AutoModel

    >>> config = AutoConfig.from_pretrained("path/to/this/repo", trust_remote_code=True)
    >>> model = AutoModel.from_config(config, trust_remote_code=True)
    ```"""

    model_type = "attention_unet"

    encoder_name: str = "convnext_tiny"
    decoder_channels: list[int] | tuple[int, ...] = (256, 128, 64, 32, 16)
    use_attention_gates: bool = True
    attention_channels_ratio: float | int = 0.5
    attention_gate_output_transform: bool = True
    decoder_upsampling: str = "nearest"
    num_channels: int = 3
    image_size: int = 256
    num_output_channels: int = 1
    loss_alpha: float | int = 0.5
    threshold: float | int = 0.5
    drop_path_rate: float | int = 0.0

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = {0: "background", 1: "polyp"}
            self.label2id = {"background": 0, "polyp": 1}
        self.decoder_channels = list(self.decoder_channels)
        self._check_fields()
        super().__post_init__(**kwargs)

    def __setattr__(self, key, value):
        # `from_pretrained(..., **overrides)` and `update_from_string` set fields one by one after `__init__`: check
        # them there too, so a bad value fails when the config is built, not deep inside a forward pass.
        super().__setattr__(key, value)
        if key in _CHECKED_FIELDS and self.__dict__.get("_post_init_done"):
            if key == "decoder_channels":
                super().__setattr__(key, list(value))
            self._check_fields()

    def _check_fields(self) -> None:
        # Raised here rather than in a strict `validate_*` hook: those wrap the error in a non-ValueError type.
        if not timm.is_model(self.encoder_name):
            raise ValueError(f"`encoder_name`={self.encoder_name!r} is not a model timm knows (see `timm.list_models()`).")
        if len(self.decoder_channels) == 0:
            raise ValueError("`decoder_channels` is empty: the decoder needs at least one stage.")
        bad = [c for c in self.decoder_channels if not isinstance(c, int) or isinstance(c, bool) or c <= 0]
        if bad:
            raise ValueError(f"`decoder_channels` must hold positive integers, got {self.decoder_channels}.")
        if self.decoder_upsampling not in DECODER_UPSAMPLING_MODES:
            raise ValueError(
                f"`decoder_upsampling` must be one of {list(DECODER_UPSAMPLING_MODES)}, got {self.decoder_upsampling!r}."
            )
        if not 0.0 < self.attention_channels_ratio <= 1.0:
            raise ValueError(f"`attention_channels_ratio` must lie in (0, 1], got {self.attention_channels_ratio}.")
        for name in ("num_channels", "image_size", "num_output_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if not 0.0 <= self.loss_alpha <= 1.0:
            raise ValueError(f"`loss_alpha` must lie in [0, 1], got {self.loss_alpha}.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"`threshold` must lie in (0, 1), got {self.threshold}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` must lie in [0, 1), got {self.drop_path_rate}.")


DECODER_UPSAMPLING_MODES = ("nearest", "transposed_conv")
_CHECKED_FIELDS = {
    "encoder_name", "decoder_channels", "attention_channels_ratio", "decoder_upsampling", "num_channels", "image_size",
    "num_output_channels", "loss_alpha", "threshold", "drop_path_rate",
}

__all__ = ["AttentionUNetConfig"]
