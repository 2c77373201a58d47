"""Attention U-Net (Oktay et al., 2018) on a timm encoder, for binary semantic segmentation."""

import math
import warnings

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils import is_torchdynamo_compiling

from .configuration_attention_unet import AttentionUNetConfig

try:
    # transformers >= 5: the same functions, but they leave tensors that were loaded from a checkpoint untouched.
    from transformers import initialization as init
except ImportError:
    from torch.nn import init

ATTENTION_GATE_INITIAL_LOGIT = 3.0
# How far outside [0, 1] the first input may reach before the model warns: resampling with overshoot (bicubic,
# Lanczos) takes [0, 1] images a little past either end.
UNIT_RANGE_SLACK = 0.25


def _is_traced() -> bool:
    """Whether this forward is being compiled, exported or traced (no host reads there)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6
    return is_torchdynamo_compiling() or exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def attention_unet_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, smooth: float = 1.0,
                        dice_on_empty_masks: bool = True) -> torch.Tensor:
    """`alpha * BCE + (1 - alpha) * soft Dice`, the Dice averaged over images (with `dice_on_empty_masks=False`,
    over the images whose mask is not empty: polyp-free images then count through the BCE alone).

    Args:
        logits: `(B, 1, H, W)` raw scores.
        labels: `(B, 1, H, W)` targets in {0, 1}.
    """
    # A float16 sum over one 256x256 mask already overflows, so the loss always runs in float32.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        labels = labels.float()
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        probs = logits.sigmoid().flatten(1)
        labels = labels.flatten(1)
        intersection = (probs * labels).sum(dim=1)
        dice = (2.0 * intersection + smooth) / (probs.sum(dim=1) + labels.sum(dim=1) + smooth)
        if dice_on_empty_masks:
            dice_loss = (1.0 - dice).mean()
        else:
            with_polyp = (labels.sum(dim=1) > 0).float()
            dice_loss = ((1.0 - dice) * with_polyp).sum() / with_polyp.sum().clamp(min=1.0)
        return alpha * bce + (1.0 - alpha) * dice_loss


class AttentionUNetPixelNormalization(nn.Module):
    """`(pixel_values - mean) / std` per channel: RGB in [0, 1] to what the encoder was trained on. The statistics are
    the config's, held as non-persistent buffers (they follow `.to()`, and no checkpoint needs to hold them)."""

    def __init__(self, config: AttentionUNetConfig):
        super().__init__()
        if config.image_std is None or len(config.image_mean) != config.num_channels or len(
                config.image_std) != config.num_channels:
            raise ValueError(
                f"`image_mean` {config.image_mean} and `image_std` {config.image_std} must both hold one value per "
                f"input channel ({config.num_channels}), or both be None (inputs already normalised)."
            )
        self.image_mean, self.image_std = config.image_mean, config.image_std
        self.register_buffer("mean", torch.empty(1, config.num_channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, config.num_channels, 1, 1), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Fills the buffers from the config (after `from_pretrained`, which may leave non-persistent buffers empty)."""
        if not self.mean.is_meta:
            self.mean.copy_(torch.tensor(self.image_mean).view_as(self.mean))
            self.std.copy_(torch.tensor(self.image_std).view_as(self.std))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return (pixel_values - self.mean) / self.std


class AttentionUNetConvNormAct(nn.Module):
    """3x3 convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(hidden_state)))


class AttentionUNetAttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. (2018), Fig. 2.

    The skip feature `x` (stride s) is projected with a stride-2 convolution to the resolution of the gating signal `g`
    (stride 2s, the coarser decoder feature); `ReLU(W_x x + W_g g)` goes through a 1x1 convolution `psi` and a sigmoid,
    and the coefficient map, resampled back to the skip's resolution, scales the skip. With `output_transform`, the
    gated skip then passes through the paper's output transform `W` (1x1 convolution and BatchNorm), which keeps its
    scale independent of how open the gate is.
    """

    def __init__(self, skip_channels: int, gating_channels: int, inter_channels: int, output_transform: bool = False):
        super().__init__()
        self.skip_proj = nn.Conv2d(skip_channels, inter_channels, kernel_size=2, stride=2, bias=False)
        self.gating_proj = nn.Conv2d(gating_channels, inter_channels, kernel_size=1)
        self.psi = nn.Conv2d(inter_channels, 1, kernel_size=1)
        self.output_transform = None
        if output_transform:
            self.output_transform = nn.Sequential(
                nn.Conv2d(skip_channels, skip_channels, kernel_size=1, bias=False), nn.BatchNorm2d(skip_channels)
            )

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the gated skip `(B, C_skip, h, w)` and the coefficients `(B, 1, h, w)`."""
        projected_skip = self.skip_proj(skip)
        projected_gating = self.gating_proj(gating)
        if projected_gating.shape[-2:] != projected_skip.shape[-2:]:
            # Encoders whose stages are not exact halvings (odd intermediate sizes) land here.
            projected_gating = F.interpolate(projected_gating, size=projected_skip.shape[-2:], mode="bilinear")
        coefficients = self.psi(F.relu(projected_skip + projected_gating)).sigmoid()
        coefficients = F.interpolate(coefficients, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        gated = skip * coefficients
        if self.output_transform is not None:
            gated = self.output_transform(gated)
        return gated, coefficients


class AttentionUNetDecoderBlock(GradientCheckpointingLayer):
    """One decoder stage: 2x upsampling, the gated skip concatenated (when the encoder has one at this resolution),
    then two 3x3 convolutions. `config.decoder_upsampling` picks nearest-neighbour upsampling of the whole coarse
    feature (as smp's U-Net) or a learned transposed convolution to `out_channels` (the v1 weights, stages 1-9)."""

    def __init__(self, config: AttentionUNetConfig, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.upsample = None
        upsampled_channels = in_channels
        if config.decoder_upsampling == "transposed_conv":
            self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
            upsampled_channels = out_channels
        self.attention_gate = None
        if skip_channels and config.use_attention_gates:
            inter_channels = max(1, round(skip_channels * config.attention_channels_ratio))
            self.attention_gate = AttentionUNetAttentionGate(
                skip_channels, in_channels, inter_channels, config.attention_gate_output_transform
            )
        self.conv1 = AttentionUNetConvNormAct(upsampled_channels + skip_channels, out_channels)
        self.conv2 = AttentionUNetConvNormAct(out_channels, out_channels)

    def forward(
        self, hidden_state: torch.Tensor, skip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_state` `(B, C_in, h, w)` -> `(B, C_out, 2h, 2w)`, and the gate's coefficients `(B, 1, 2h, 2w)`."""
        coefficients = None
        if skip is not None and self.attention_gate is not None:
            skip, coefficients = self.attention_gate(skip, hidden_state)
        if self.upsample is None:
            hidden_state = F.interpolate(hidden_state, scale_factor=2.0, mode="nearest")
        else:
            hidden_state = self.upsample(hidden_state)
        if skip is not None:
            hidden_state = torch.cat([hidden_state, skip], dim=1)
        hidden_state = self.conv2(self.conv1(hidden_state))
        return hidden_state, coefficients


class AttentionUNetDecoder(nn.Module):
    """Decodes the encoder's features from its total stride back to stride 1, one 2x stage at a time; every stage
    whose output resolution has an encoder feature takes it as a gated skip."""

    def __init__(self, config: AttentionUNetConfig, encoder_channels: list[int], encoder_strides: list[int]):
        super().__init__()
        total_stride = encoder_strides[-1]
        num_stages = round(math.log2(total_stride))
        if len(config.decoder_channels) != num_stages:
            raise ValueError(
                f"`decoder_channels` has {len(config.decoder_channels)} stages, but the encoder "
                f"{config.encoder_name!r} has a total stride of {total_stride}, which needs {num_stages} stages of 2x "
                "upsampling to reach the input resolution."
            )
        skip_channels_by_stride = dict(zip(encoder_strides[:-1], encoder_channels[:-1]))
        self.skip_strides = []
        blocks = []
        in_channels = encoder_channels[-1]
        stride = total_stride
        for out_channels in config.decoder_channels:
            stride //= 2
            skip_channels = skip_channels_by_stride.get(stride, 0)
            self.skip_strides.append(stride if skip_channels else None)
            blocks.append(AttentionUNetDecoderBlock(config, in_channels, skip_channels, out_channels))
            in_channels = out_channels
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, features: list[torch.Tensor], encoder_strides: list[int]
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """`features`: one `(B, C_i, H/s_i, W/s_i)` per encoder stage. Returns every stage's output, coarsest first and
        ending with `(B, C_last, H, W)`, and the gate maps."""
        feature_by_stride = dict(zip(encoder_strides, features))
        hidden_state = features[-1]
        stage_outputs, gate_maps = [], []
        for block, skip_stride in zip(self.blocks, self.skip_strides):
            skip = feature_by_stride[skip_stride] if skip_stride is not None else None
            hidden_state, coefficients = block(hidden_state, skip)
            stage_outputs.append(hidden_state)
            if coefficients is not None:
                gate_maps.append(coefficients)
        return tuple(stage_outputs), tuple(gate_maps)


class AttentionUNetPreTrainedModel(PreTrainedModel):
    config: AttentionUNetConfig
    config_class = AttentionUNetConfig
    base_model_prefix = "attention_unet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["AttentionUNetDecoderBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this on every module that holds tensors of its own (under `trust_remote_code`, on those
        # only), so the rules are per leaf. Only the decoder and head are ours to initialise: the timm encoder's
        # weights come from timm's own init, ImageNet or a checkpoint.
        gates = [block.attention_gate for block in self.decoder.blocks if block.attention_gate is not None]
        heads = [self.segmentation_head, *(self.auxiliary_heads or ())]
        if any(module is head for head in heads):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif any(module is gate.psi for gate in gates):
            # Gates start open and uniform (every coefficient sigmoid(3) = 0.95): the decoder starts as a plain U-Net,
            # which optimises fast, and the gates learn what to suppress as `psi` moves away from zero.
            init.zeros_(module.weight)
            init.constant_(module.bias, ATTENTION_GATE_INITIAL_LOGIT)
        elif not any(module is decoder_module for decoder_module in self.decoder.modules()):
            return
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, stricter: weights that do not match the model the config builds (tensors
        missing or left over) are an error naming the checkpoint, not a logged warning; and the encoder's tensors that
        transformers re-creates (mismatched under `ignore_mismatched_sizes`, or non-persistent buffers) get timm's own
        values, since transformers initialises only what `_init_weights` knows."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        problems = []
        # Auxiliary heads only add to the training loss: weights saved without them are complete for inference and
        # a start for training with them, which `_init_weights` gives their first values.
        missing = [name for name in loading_info["missing_keys"] if not name.startswith("auxiliary_heads.")]
        if missing:
            problems.append(f"missing tensor(s) {_listed(missing)}")
        if loading_info["unexpected_keys"]:
            problems.append(f"tensor(s) {_listed(loading_info['unexpected_keys'])} that this config does not build")
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path}: the weights do not match the model its config builds: "
                + "; ".join(problems) + "."
            )
        mismatched = [entry[0] if isinstance(entry, (tuple, list)) else entry  # (name, shapes) tuples in some releases
                      for entry in loading_info["mismatched_keys"]]
        model._reset_recreated_encoder_tensors(mismatched)
        if model.pixel_normalization is not None:
            model.pixel_normalization.reset_buffers()
        return (model, loading_info) if output_loading_info else model

    @torch.no_grad()
    def _reset_recreated_encoder_tensors(self, recreated: list[str]) -> None:
        prefix = "encoder."
        recreated = {name[len(prefix):] for name in recreated if name.startswith(prefix)}
        persistent = set(self.encoder.state_dict())
        tensors = dict(self.encoder.named_parameters()) | dict(self.encoder.named_buffers())
        to_reset = {name for name in tensors if name in recreated or name not in persistent}
        if not to_reset:
            return
        fresh = self._create_encoder(self.config)
        fresh_tensors = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
        for name in to_reset:
            if not tensors[name].is_meta:
                tensors[name].copy_(fresh_tensors[name])


def _listed(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class AttentionUNetForSemanticSegmentation(AttentionUNetPreTrainedModel):
    """Attention U-Net: timm encoder -> gated U-Net decoder down to stride 1 -> 1x1 head with `num_output_channels`."""

    def __init__(self, config: AttentionUNetConfig):
        super().__init__(config)
        if config.image_mean is None and config.image_std is not None:
            raise ValueError(f"`image_std` is {config.image_std} but `image_mean` is None: set both or neither.")
        self.pixel_normalization = None
        if config.normalizes_inputs:
            self.pixel_normalization = AttentionUNetPixelNormalization(config)
        self.input_range_checked = False
        # Never pretrained here: `from_pretrained` re-runs `__init__`, and ImageNet weights are loaded on request by
        # `load_encoder_pretrained_weights`.
        self.encoder = self._create_encoder(config)
        # Transformer-style encoders (Swin, MambaOut, ...) give channels-last features; the decoder is channels-first.
        self.encoder_channels_last = getattr(self.encoder, "output_fmt", "NCHW") == "NHWC"
        self.encoder_grad_checkpointing = False
        self.encoder_channels = list(self.encoder.feature_info.channels())
        self.encoder_strides = list(self.encoder.feature_info.reduction())
        self.decoder = AttentionUNetDecoder(config, self.encoder_channels, self.encoder_strides)
        self.segmentation_head = nn.Conv2d(config.decoder_channels[-1], config.num_output_channels, kernel_size=1)
        self.auxiliary_heads = None
        if config.use_auxiliary_heads:
            self.auxiliary_heads = nn.ModuleList(
                nn.Conv2d(channels, config.num_output_channels, kernel_size=1)
                for channels in config.decoder_channels[:-1]
            )
        self.post_init()

    @staticmethod
    def _create_encoder(config: AttentionUNetConfig) -> nn.Module:
        return timm.create_model(
            config.encoder_name,
            pretrained=False,
            features_only=True,
            in_chans=config.num_channels,
            drop_path_rate=config.drop_path_rate,
        )

    @property
    def total_stride(self) -> int:
        return self.encoder_strides[-1]

    def load_encoder_pretrained_weights(self, checkpoint_path: str | None = None) -> None:
        """Loads ImageNet weights into the encoder with timm: from timm's default source (the Hub or timm's cache)
        or, with `checkpoint_path`, from a local timm checkpoint file of the same architecture."""
        overlay = {"file": str(checkpoint_path)} if checkpoint_path else None
        pretrained = timm.create_model(
            self.config.encoder_name,
            pretrained=True,
            features_only=True,
            in_chans=self.config.num_channels,
            pretrained_cfg_overlay=overlay,
        )
        self.encoder.load_state_dict(pretrained.state_dict())

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {self.config.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )

    def _warn_once_if_not_unit_range(self, pixel_values: torch.Tensor) -> None:
        # Input scaled or normalised the wrong way runs without error and gives bad masks, so the first batch a model
        # sees is checked; only that one, because reading its range waits for the device.
        if self.input_range_checked or _is_traced():
            return
        self.input_range_checked = True
        low, high = (float(value) for value in torch.aminmax(pixel_values.detach().float()))
        if low >= -UNIT_RANGE_SLACK and high <= 1.0 + UNIT_RANGE_SLACK:
            return
        if low < -UNIT_RANGE_SLACK:
            cause = ("they look normalised already: this model normalises them itself (`config.image_mean`, "
                     "`config.image_std`), so they would be normalised twice")
        elif high > 3.0:
            cause = "they look like 0-255 values: divide by 255 (or use the image processor)"
        else:
            cause = "they are outside [0, 1]"
        warnings.warn(
            f"`pixel_values` range from {low:.3g} to {high:.3g}, but this model takes RGB values in [0, 1]: {cause}. "
            "The image processor of this repository (`AutoImageProcessor`) prepares them as the model expects.",
            stacklevel=2,
        )

    def _pad_to_total_stride(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        pad_height = -height % self.total_stride
        pad_width = -width % self.total_stride
        if pad_height or pad_width:
            pixel_values = F.pad(pixel_values, (0, pad_width, 0, pad_height))
        return pixel_values

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of `(B, 1, H, W)` logits against `(B, H, W)` or `(B, 1, H, W)` labels in {0, 1}."""
        if labels.ndim == 3:
            labels = labels.unsqueeze(1)
        if labels.shape != logits.shape:
            raise ValueError(
                f"`labels` must have shape (batch, height, width) or (batch, 1, height, width) matching the logits "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}."
            )
        return attention_unet_loss(logits, labels, self.config.loss_alpha,
                                   dice_on_empty_masks=self.config.dice_on_empty_masks)

    def compute_auxiliary_loss(self, stage_outputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of the auxiliary heads on the decoder stages before the last, their logits upsampled bilinearly
        to the labels' `(H, W)`."""
        size = stage_outputs[-1].shape[-2:]  # the padded input's
        height, width = labels.shape[-2:]
        losses = [
            self.compute_loss(F.interpolate(head(stage), size=size, mode="bilinear")[..., :height, :width], labels)
            for head, stage in zip(self.auxiliary_heads, stage_outputs)
        ]
        return torch.stack(losses).mean()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            Images of any height and width: RGB in [0, 1], which the model normalises with `config.image_mean` and
            `config.image_std`; or, where those are None (configs saved before they existed), already normalised.
        labels (`torch.Tensor` of shape `(batch_size, height, width)` or `(batch_size, 1, height, width)`, *optional*):
            Ground-truth masks with values in {0, 1}. When given, the output carries the BCE + Dice loss (plus the
            auxiliary heads' with `config.use_auxiliary_heads`).
        output_attentions (`bool`, *optional*):
            Return the attention gates' coefficient maps, one `(batch_size, 1, h, w)` per skip, coarsest first.
        output_hidden_states (`bool`, *optional*):
            Return the encoder's feature maps, finest first.

        Returns logits of shape `(batch_size, num_output_channels, height, width)`.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)
        height, width = pixel_values.shape[-2:]
        if self.pixel_normalization is not None:
            self._warn_once_if_not_unit_range(pixel_values)
            pixel_values = self.pixel_normalization(pixel_values)

        # timm's stages have a switch of their own: follow the one transformers sets on the decoder blocks (through
        # `gradient_checkpointing_enable` or `activation_checkpointing_enable`, whichever the release has).
        if self.decoder.blocks[0].gradient_checkpointing != self.encoder_grad_checkpointing:
            self.encoder_grad_checkpointing = self.decoder.blocks[0].gradient_checkpointing
            self.encoder.set_grad_checkpointing(self.encoder_grad_checkpointing)
        features = self.encoder(self._pad_to_total_stride(pixel_values))
        if self.encoder_channels_last:
            features = [feature.permute(0, 3, 1, 2) for feature in features]
        stage_outputs, gate_maps = self.decoder(features, self.encoder_strides)
        logits = self.segmentation_head(stage_outputs[-1])[..., :height, :width]
        gate_maps = tuple(gate_map[..., : math.ceil(height / stride), : math.ceil(width / stride)]
                          for gate_map, stride in zip(gate_maps, filter(None, self.decoder.skip_strides)))

        loss = None
        if labels is not None:
            loss = self.compute_loss(logits, labels)
            if self.auxiliary_heads is not None:
                loss = loss + self.config.auxiliary_loss_weight * self.compute_auxiliary_loss(stage_outputs, labels)

        output = SemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(features) if output_hidden_states else None,
            attentions=gate_maps if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["AttentionUNetPreTrainedModel", "AttentionUNetForSemanticSegmentation", "attention_unet_loss"]
