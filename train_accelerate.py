#!/usr/bin/env python
"""Trains the Attention U-Net on Kvasir-SEG (or any folder or Hub copy laid out like it) with Accelerate.

    accelerate launch train_accelerate.py --config recipes/seed_gpu.yaml --output_dir runs/seed  # on a GPU
    python train_accelerate.py --output_dir runs/cpu --per_device_train_batch_size 8             # same code on a CPU
    python train_accelerate.py --config recipes/cpu_stage10.yaml --output_dir runs/stage10 \
        --dataset_name ../shared/data/kvasir-seg                                                  # the shipped run

The defaults are the seed recipe: AdamW at 1e-3, cosine decay with 5 % linear warm-up, weight decay 1e-4, batch 64,
50 epochs at 256x256, BCE + Dice (alpha 0.5), fp16, flips / rotation / colour jitter. The output folder is itself a
loadable Hub repository holding the best model by validation Dice.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, get_scheduler

from polyp_segmentation.checkpoints import (
    INVOCATIONS_FILE,
    METRICS_FILE,
    continue_from_snapshot,
    load_checkpoint,
    save_best_model,
    save_checkpoint,
    save_snapshot,
)
from polyp_segmentation.cli import add_float32_matmul_precision_argument
from polyp_segmentation.data import (
    DEFAULT_DATASET,
    DataError,
    PolypMixtureDataset,
    PolypSegmentationDataset,
    decode_samples,
    largest_polyp_free_crops,
    load_negative_splits,
    load_splits,
    polyp_free_crops,
    processor_normalization,
    training_augmentation,
)
from polyp_segmentation.hub import HubPusher
from polyp_segmentation.loading import check_input_convention, check_remote_code_arguments, load_model
from polyp_segmentation.training import (
    EpochTotals,
    build_optimizer,
    check_replicas_in_sync,
    dataloader_settings,
    parameters_are_sharded,
    selection_score,
    train_one_epoch,
    validate,
    validate_polyp_free,
)

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
# The polyp-free validation sets: --negative_dataset_name's validation split, and random and largest polyp-free
# crops of the validation frames.
NEGATIVE_EVAL_SETS = ("eval_negatives_dataset", "eval_negatives_crops", "eval_negatives_largest_crops")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="RECIPE.yaml",
                        help="A recipe: a YAML file of flag values (names without the leading dashes, e.g. "
                             "recipes/cpu_stage10.yaml); flags on the command line override it.")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=DEFAULT_DATASET,
                      help="A Hub dataset id, or a local folder with images/, masks/ and splits/.")
    data.add_argument("--image_column_name", default=None, help="Image column of a Hub copy (default: detected).")
    data.add_argument("--label_column_name", default=None, help="Mask column of a Hub copy (default: detected).")
    data.add_argument("--resolution", type=int, default=256, help="Side images are resized to (and validated at).")
    data.add_argument("--train_crop_size", type=int, default=None,
                      help="Train on random crops of this side taken from the resized images (cheaper steps at the "
                           "final scale); validation still sees whole images.")
    data.add_argument("--train_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                      help="Random resized crops covering this fraction of each training image's area (e.g. 0.5 1.0), "
                           "resized back to --train_crop_size or --resolution: scale augmentation.")
    data.add_argument("--train_scale_jitter", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                      help="Zoom each training image by a random factor in [LOW, HIGH] (e.g. 0.75 1.33), before any "
                           "crop: scale augmentation around the scale the model is evaluated at.")
    data.add_argument("--strong_augmentation", action="store_true",
                      help="The augmentation of the best published from-scratch Kvasir-SEG recipe (DUCK-Net): "
                           "rotation +/-180 degrees, translation +/-12.5 %%, shear +/-22.5 degrees, zoom 0.5-1.5 (or "
                           "--train_scale_jitter), brightness 0.6-1.6, instead of the seed recipe's milder one.")
    data.add_argument("--final_full_frame_epochs", type=int, default=0,
                      help="Train the last N epochs on whole images at --resolution instead of --train_crop_size "
                           "crops, so training ends at the scale and context of evaluation.")
    data.add_argument("--train_eval_samples", type=int, default=100,
                      help="After every epoch, also score this many training images (spread evenly over the split, "
                           "no augmentation) next to validation, to tell underfitting from overfitting; 0 skips it.")
    data.add_argument("--negative_dataset_name", default=None,
                      help="Polyp-free frames to mix into training (no masks: all empty): a folder with images/ and "
                           "splits/train.txt, validation.txt, or a Hub dataset with train and validation splits of "
                           "images. Its validation split's false-alarm rate is logged every epoch and takes part in "
                           "choosing the best model.")
    data.add_argument("--negative_ratio", type=float, default=None,
                      help="Share of each epoch's training items that are polyp-free (default 0.5 with "
                           "--negative_dataset_name, else 0): frames of --negative_dataset_name and polyp-free crops "
                           "of the training frames themselves (--own_negative_share of them).")
    data.add_argument("--own_negative_share", type=float, default=0.5,
                      help="Of the polyp-free items, the share that are crops of the training frames away from their "
                           "polyp (black border and on-screen text included), so that the frames' layout cannot be "
                           "the cue (1.0 without --negative_dataset_name).")
    data.add_argument("--near_polyp_share", type=float, default=0.0,
                      help="Of the crops of the training frames, the share that are the square just past the "
                           "polyp's margin (no border) rather than a random one: where a model marks most.")
    data.add_argument("--closeup_probability", type=float, default=0.0,
                      help="Probability that a polyp frame is replaced by a close-up crop around its polyp, so that "
                           "a close-up view is not taken for a polyp-free one.")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument("--skip_bad_samples", action="store_true",
                      help="Leave out (and list) samples that cannot be used instead of stopping.")
    data.add_argument("--augment_on_device", action=argparse.BooleanOptionalAction, default=None,
                      help="Augment each batch on the training device (the same draws per sample) instead of in the "
                           "DataLoader (default: on with a GPU, off on a CPU, where the workers' path is as fast).")
    data.add_argument("--dataloader_num_workers", type=int, default=None,
                      help="DataLoader workers per process (default: 0 on a CPU, where they would compete with the "
                           "step for the same cores; min(8, cores / processes) with a GPU, which waits for "
                           "augmentation done in the training process).")

    model = parser.add_argument_group("model")
    model.add_argument("--config_name", default=None,
                       help="Folder or Hub id whose config.json and preprocessor config define the architecture "
                            "(default: --init_from's, else this repository's).")
    model.add_argument("--config_overrides", default=None,
                       help="Comma-separated config overrides, e.g. 'encoder_name=convnext_atto,"
                            "decoder_channels=[64,32,16,8,8]'.")
    model.add_argument("--init_from", default=None,
                       help="Start from the weights of a saved model (folder or Hub id): fine-tuning, or continuing a "
                            "long run in stages.")
    model.add_argument("--trust_remote_code", action="store_true",
                       help="Allow a Hub id for --config_name or --init_from: that repository's Python code "
                            "(configuration, model, processor) then runs here. Local folders need no flag.")
    model.add_argument("--init_encoder_from", default=None,
                       help="Start only the encoder from a saved model folder of this architecture (its `encoder.*` "
                            "tensors); the decoder and head start from their initialisation: a new decoder on a "
                            "trained encoder.")
    model.add_argument("--encoder_pretrained", nargs="?", const="timm", default=None,
                       help="Load ImageNet weights into the encoder through timm (needs the Hub or timm's cache); "
                            "give a path to use a local timm checkpoint file instead.")
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument("--channels_last", action="store_true",
                       help="Train with weights and inputs in channels-last memory format (faster convolutions on "
                            "most CPUs and on GPUs with tensor cores).")
    model.add_argument("--torch_compile", action="store_true",
                       help="Compile the training forward pass with torch.compile (validation stays eager).")
    model.add_argument("--torch_compile_mode", default=None,
                       help="torch.compile's mode: 'default', 'reduce-overhead' or 'max-autotune'.")
    model.add_argument("--torch_compile_backend", default=None, help="torch.compile's backend (default: inductor).")
    add_float32_matmul_precision_argument(model)

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", required=True)
    training.add_argument("--num_train_epochs", type=int, default=50)
    training.add_argument("--max_train_steps", type=int, default=None,
                          help="Stop after this many optimiser steps (overrides the epochs' count for the schedule).")
    training.add_argument("--per_device_train_batch_size", type=int, default=64)
    training.add_argument("--per_device_eval_batch_size", type=int, default=16)
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--learning_rate", type=float, default=1e-3)
    training.add_argument("--weight_decay", type=float, default=1e-4)
    training.add_argument("--lr_scheduler_type", default="cosine")
    training.add_argument("--warmup_ratio", type=float, default=0.05)
    training.add_argument("--model_ema_decay", type=float, default=None,
                          help="Keep an exponential moving average of the weights with this decay per optimiser step "
                               "(e.g. 0.998), and validate and save it instead of the raw weights (timm's ModelEmaV3).")
    training.add_argument("--model_ema_warmup", action="store_true",
                          help="Ramp the moving average's decay up from 0 towards --model_ema_decay (timm's EMA "
                               "warm-up), so early averages are not dominated by the initial weights.")
    training.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="fp16",
                          help="fp16 falls back to fp32 (with a warning) where there is no GPU.")
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--report_to", default="tensorboard", help="Accelerate trackers, or 'none'.")
    training.add_argument("--logging_steps", type=int, default=10,
                          help="Optimiser steps between reads of the loss on the host (progress bar, non-finite "
                               "check); the step loop itself never waits for the device.")

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument("--checkpointing_steps", default="epoch",
                             help="'epoch', or a number of optimiser steps between checkpoints.")
    checkpoints.add_argument("--save_total_limit", type=int, default=None,
                             help="Keep only the newest N checkpoints (the best model is kept apart and never "
                                  "deleted).")
    checkpoints.add_argument("--resume_from_checkpoint", default=None,
                             help="A checkpoint folder, or 'latest' for the newest one in --output_dir.")
    checkpoints.add_argument("--start_epoch", type=int, default=0,
                             help="Start the schedule (learning rate, data order) at this epoch, as if the epochs "
                                  "before it had run: continues a run whose checkpoints are lost from its saved "
                                  "weights (--init_from); the optimiser's moments start afresh.")
    checkpoints.add_argument("--snapshot_dir", default=None,
                             help="After every epoch, also write the validated weights (the moving average's, with "
                                  "--model_ema_decay) in fp16, the run's logs and its place in the schedule to this "
                                  "folder: a resume point small enough to commit. --resume_from_checkpoint latest "
                                  "continues from it where --output_dir has no checkpoint (a new machine), at the "
                                  "same point of the schedule, the optimiser's moments afresh.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None)
    hub.add_argument("--hub_token", default=None)
    hub.add_argument("--hub_private_repo", action="store_true")

    recipe, _ = parser.parse_known_args(argv)
    if recipe.config:
        parser.set_defaults(**load_recipe(recipe.config, parser))
    args = parser.parse_args(argv)
    args.config_name = args.config_name or args.init_from or str(REPO_ROOT)
    check_remote_code_arguments(parser, args.trust_remote_code,
                                {"--init_from": args.init_from, "--config_name": args.config_name})
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    if args.logging_steps < 1:
        parser.error("--logging_steps must be at least 1.")
    if args.checkpointing_steps != "epoch" and not args.checkpointing_steps.isdigit():
        parser.error(f"--checkpointing_steps must be 'epoch' or a positive integer, got {args.checkpointing_steps!r}.")
    if args.train_crop_size is not None and args.train_crop_size > args.resolution:
        parser.error(f"--train_crop_size {args.train_crop_size} is larger than --resolution {args.resolution}.")
    if args.train_scale is not None and not 0 < args.train_scale[0] <= args.train_scale[1] <= 1:
        parser.error(f"--train_scale must be two area fractions 0 < MIN <= MAX <= 1, got {args.train_scale}.")
    if args.train_scale is not None and args.train_scale_jitter is not None:
        parser.error("--train_scale and --train_scale_jitter are two kinds of scale augmentation: pick one.")
    if args.train_scale_jitter is not None and not 0 < args.train_scale_jitter[0] <= args.train_scale_jitter[1]:
        parser.error(f"--train_scale_jitter must be two zoom factors 0 < LOW <= HIGH, got {args.train_scale_jitter}.")
    if args.final_full_frame_epochs < 0:
        parser.error(f"--final_full_frame_epochs must be >= 0, got {args.final_full_frame_epochs}.")
    if args.final_full_frame_epochs and args.train_crop_size is None:
        parser.error("--final_full_frame_epochs only changes a run that trains on --train_crop_size crops.")
    if args.train_eval_samples < 0:
        parser.error(f"--train_eval_samples must be >= 0, got {args.train_eval_samples}.")
    if args.start_epoch < 0 or (args.start_epoch and args.resume_from_checkpoint):
        parser.error(f"--start_epoch must be >= 0 and cannot be combined with --resume_from_checkpoint (a checkpoint "
                     f"knows its own position), got {args.start_epoch}.")
    if args.snapshot_dir and Path(args.snapshot_dir).resolve() == Path(args.output_dir).resolve():
        parser.error("--snapshot_dir must be another folder than --output_dir, whose best model it would overwrite.")
    if args.negative_ratio is None:
        args.negative_ratio = 0.5 if args.negative_dataset_name else 0.0
    if not 0 <= args.negative_ratio < 1:
        parser.error(f"--negative_ratio must lie in [0, 1), got {args.negative_ratio}.")
    for flag in ("own_negative_share", "near_polyp_share", "closeup_probability"):
        if not 0 <= getattr(args, flag) <= 1:
            parser.error(f"--{flag} is a probability, got {getattr(args, flag)}.")
    if not args.negative_dataset_name:
        args.own_negative_share = 1.0
    if args.model_ema_decay is not None and not 0 < args.model_ema_decay < 1:
        parser.error(f"--model_ema_decay must lie in (0, 1), got {args.model_ema_decay}.")
    return args


def load_recipe(path: str, parser: argparse.ArgumentParser) -> dict:
    """The flag values of a recipe file, checked against the parser's flags (`parser.error` names a bad one)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"--config {path}: cannot be read as YAML ({error}).")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: must map flag names to values, got {type(values).__name__}.")
    flags = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(set(values) - flags)
    if unknown:
        parser.error(f"--config {path}: {', '.join(unknown)} are not flags of this script.")
    return values


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    mixed_precision = args.mixed_precision
    has_gpu = torch.accelerator.is_available() and not os.environ.get("ACCELERATE_USE_CPU")
    if mixed_precision == "fp16" and not has_gpu:
        # Accelerate would silently run fp32 anyway; say so once. (bf16 autocast does run on a CPU, but far slower.)
        print("warning: --mixed_precision fp16 needs a GPU; training in fp32 on the CPU.", file=sys.stderr)
        mixed_precision = "no"
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def parse_config_overrides(text: str) -> dict:
    """`'a=1,b=[1,2],c=x'` -> `{'a': 1, 'b': [1, 2], 'c': 'x'}`. Values are JSON where they parse as JSON (numbers,
    booleans, lists) and strings otherwise; commas inside brackets do not split. (transformers'
    `update_from_string` splits on every comma and takes no lists.)"""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    overrides = {}
    for item in filter(None, (item.strip() for item in items)):
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--config_overrides: {item!r} is not key=value.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def load_config_and_processor(args: argparse.Namespace):
    config = AutoConfig.from_pretrained(args.config_name, trust_remote_code=True)
    if args.config_overrides:
        overrides = parse_config_overrides(args.config_overrides)
        unknown = sorted(key for key in overrides if not hasattr(config, key))
        if unknown:
            raise ValueError(f"--config_overrides: {unknown} are not fields of {type(config).__name__}.")
        config = type(config).from_dict({**config.to_dict(), **overrides})
    processor = AutoImageProcessor.from_pretrained(args.config_name, trust_remote_code=True)
    processor.size = {"height": args.resolution, "width": args.resolution}
    check_input_convention(config, processor, f"--config_name {args.config_name}")
    return config, processor


def build_model(config, args: argparse.Namespace):
    if args.init_from:
        # fp32 master weights whatever the saved dtype (a snapshot is fp16); autocast gives the mixed precision.
        model = load_model(args.init_from, trust_remote_code=args.trust_remote_code, config=config, flag="--init_from",
                           dtype=torch.float32)
    else:
        model = AutoModel.from_config(config, trust_remote_code=True)
    if args.init_encoder_from:
        load_encoder_weights(model, Path(args.init_encoder_from) / "model.safetensors")
    if args.encoder_pretrained:
        try:
            model.load_encoder_pretrained_weights(None if args.encoder_pretrained == "timm" else args.encoder_pretrained)
        except Exception as error:  # timm raises several kinds when the Hub is unreachable
            raise RuntimeError(
                f"--encoder_pretrained: could not load ImageNet weights for {config.encoder_name!r} ({error}). They "
                "come from the Hugging Face Hub or timm's cache; offline, pass the path of a local timm checkpoint."
            ) from error
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def load_encoder_weights(model, weights_file: Path) -> None:
    """Loads the `encoder.*` tensors of a saved model into `model.encoder`; every encoder tensor must be there, with
    its shape."""
    if not weights_file.is_file():
        raise FileNotFoundError(f"--init_encoder_from: {weights_file} does not exist (a saved model folder has one).")
    encoder_state = {name.removeprefix("encoder."): tensor for name, tensor in load_file(weights_file).items()
                     if name.startswith("encoder.")}
    try:
        model.encoder.load_state_dict(encoder_state)
    except RuntimeError as error:
        raise ValueError(f"--init_encoder_from: the encoder in {weights_file} does not fit this config's encoder "
                         f"{model.config.encoder_name!r}: {error}") from error


def build_datasets(args: argparse.Namespace, processor, augment_on_device: bool = False):
    splits, problems = load_splits(args.dataset_name, args.image_column_name, args.label_column_name)
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
    decoded = {}
    for split, limit in limits.items():
        samples = splits[split][:limit] if limit else splits[split]
        names, images, masks, bad = decode_samples(samples, args.resolution)
        problems += bad
        decoded[split] = (names, images, masks)
    if problems:
        listing = "\n  ".join(problems)
        if not args.skip_bad_samples:
            raise DataError(f"{len(problems)} unusable sample(s) in {args.dataset_name}:\n  {listing}\n"
                            "Fix them, or pass --skip_bad_samples to leave them out.")
        logger.warning(f"Leaving out {len(problems)} unusable sample(s):\n  {listing}", main_process_only=True)
    for split, (names, _, _) in decoded.items():
        if not names:
            raise DataError(f"The {split} split of {args.dataset_name} has no usable sample.")
    mean, std = processor_normalization(processor)
    negatives = decode_negatives(args) if args.negative_dataset_name else {"train": [], "validation": []}

    def training_dataset(crop_size: int | None) -> PolypSegmentationDataset:
        settings = dict(image_mean=mean, image_std=std, augmentation=training_augmentation_for(args, crop_size),
                        seed=args.seed, augment_on_access=not augment_on_device)
        if not args.negative_ratio and not args.closeup_probability:
            return PolypSegmentationDataset(*decoded["train"], **settings)
        return PolypMixtureDataset(*decoded["train"], negatives["train"], args.negative_ratio,
                                   args.own_negative_share, args.closeup_probability, args.near_polyp_share,
                                   **settings)

    train = training_dataset(args.train_crop_size)
    # Same samples and seed, so the full-frame epochs draw their flips, rotations and colours as the cropped ones do.
    train_full_frame = training_dataset(None) if args.final_full_frame_epochs else None
    validation = PolypSegmentationDataset(*decoded["validation"], mean, std)
    # Polyp-free validation frames, scored per source (NEGATIVE_EVAL_SETS): the negatives' validation split, and fixed
    # polyp-free crops of the validation frames, random ones and each frame's largest.
    crops, largest_crops = [], []
    if args.negative_ratio or args.negative_dataset_name:
        crops, largest_crops = polyp_free_crops(*decoded["validation"])[1], largest_polyp_free_crops(
            *decoded["validation"])[1]
    validation_negatives = {name: polyp_free_dataset(frames, mean, std) for name, frames in
                            zip(NEGATIVE_EVAL_SETS, (negatives["validation"], crops, largest_crops))}
    train_eval = None
    if args.train_eval_samples:
        names, images, masks = decoded["train"]
        count = min(args.train_eval_samples, len(names))
        picked = [round(i * (len(names) - 1) / max(count - 1, 1)) for i in range(count)]
        train_eval = PolypSegmentationDataset([names[i] for i in picked], [images[i] for i in picked],
                                              [masks[i] for i in picked], mean, std)
    return {"train": train, "train_full_frame": train_full_frame, "eval": validation, "train_eval": train_eval,
            **validation_negatives}


def polyp_free_dataset(frames: list[torch.Tensor], mean, std) -> PolypSegmentationDataset | None:
    """`frames` with empty masks, or `None` for no frames."""
    if not frames:
        return None
    masks = [torch.zeros(frame.shape[-2:], dtype=torch.bool) for frame in frames]
    return PolypSegmentationDataset([str(i) for i in range(len(frames))], frames, masks, mean, std)


def decode_negatives(args: argparse.Namespace) -> dict[str, list[torch.Tensor]]:
    """The polyp-free frames of `--negative_dataset_name`, per split, decoded at `--resolution`; every unusable frame
    is named before training starts."""
    frames, problems = {}, []
    for split, samples in load_negative_splits(args.negative_dataset_name).items():
        _, images, _, bad = decode_samples(samples, args.resolution)
        frames[split], problems = images, problems + bad
    if problems:
        listing = "\n  ".join(problems)
        if not args.skip_bad_samples:
            raise DataError(f"{len(problems)} unusable frame(s) in {args.negative_dataset_name}:\n  {listing}\n"
                            "Fix them, or pass --skip_bad_samples to leave them out.")
        logger.warning(f"Leaving out {len(problems)} unusable polyp-free frame(s):\n  {listing}", main_process_only=True)
    for split, images in frames.items():
        if not images:
            raise DataError(f"The {split} split of {args.negative_dataset_name} has no usable frame.")
    return frames


def training_augmentation_for(args: argparse.Namespace, crop_size: int | None):
    """The training augmentation of `args`, with crops of `crop_size` (`None`: whole images)."""
    if args.train_scale is not None:
        return training_augmentation(crop_size or args.resolution, scale=tuple(args.train_scale),
                                     strong=args.strong_augmentation)
    zoom = tuple(args.train_scale_jitter) if args.train_scale_jitter is not None else None
    return training_augmentation(crop_size, zoom=zoom, strong=args.strong_augmentation)


def build_dataloaders(args: argparse.Namespace, accelerator: Accelerator, datasets: dict) -> dict:
    """One DataLoader per dataset (`None` stays `None`): the training ones shuffled, from their own generator."""
    loaders = {}
    for name, dataset in datasets.items():
        if dataset is None:
            loaders[name] = None
        elif name.startswith("train") and name != "train_eval":
            loaders[name] = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_train_batch_size,
                                                        shuffle=True, drop_last=True,
                                                        **dataloader_settings(args, accelerator))
        else:
            loaders[name] = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_eval_batch_size)
    return loaders


def build_lr_scheduler(args: argparse.Namespace, accelerator: Accelerator, optimizer, steps_per_epoch: int):
    """The schedule over the whole run, stepped forward to `--start_epoch`; returns it, the run's optimiser steps and
    its epochs."""
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # Accelerate's prepared scheduler steps once per process at every optimiser step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=round(args.warmup_ratio * max_train_steps) * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    if args.start_epoch >= num_train_epochs:
        raise ValueError(f"Epoch {args.start_epoch} to start from (--start_epoch, or the snapshot's in --snapshot_dir) "
                         f"is past the schedule's last epoch ({num_train_epochs}): the run has ended.")
    with warnings.catch_warnings():
        # Stepping the schedule before the optimiser is the point here; torch warns that it looks like a mistake.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(args.start_epoch * steps_per_epoch * accelerator.num_processes):
            lr_scheduler.step()
    return lr_scheduler, max_train_steps, num_train_epochs


def build_model_ema(args: argparse.Namespace, accelerator: Accelerator, model) -> ModelEmaV3 | None:
    """The moving average of the weights, validated and saved in place of the raw weights; every process keeps an
    identical copy."""
    if args.model_ema_decay is None:
        return None
    if parameters_are_sharded(accelerator):
        raise ValueError("--model_ema_decay keeps a full copy of the weights on every process, which FSDP and "
                         "DeepSpeed ZeRO-3 shard: train without it there, or with DDP / ZeRO-1/2.")
    return ModelEmaV3(accelerator.unwrap_model(model), args.model_ema_decay, use_warmup=args.model_ema_warmup)


def describe_run(args: argparse.Namespace, accelerator: Accelerator, config, datasets: dict, max_train_steps: int,
                 num_train_epochs: int) -> dict:
    """The run's settings, for `invocations.jsonl`, the trackers and the output folder's card."""
    return {
        "encoder_name": config.encoder_name, "resolution": args.resolution, "train_crop_size": args.train_crop_size,
        "train_scale": args.train_scale, "train_scale_jitter": args.train_scale_jitter,
        "strong_augmentation": args.strong_augmentation,
        "final_full_frame_epochs": args.final_full_frame_epochs, "model_ema_decay": args.model_ema_decay,
        "num_train_epochs": num_train_epochs, "max_train_steps": max_train_steps,
        "total_batch_size": args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "weight_decay": args.weight_decay, "warmup_ratio": args.warmup_ratio,
        "lr_scheduler_type": args.lr_scheduler_type, "mixed_precision": accelerator.mixed_precision,
        "seed": args.seed, "dataset_name": args.dataset_name, "init_from": args.init_from,
        "init_encoder_from": args.init_encoder_from,
        "start_epoch": args.start_epoch, "negative_dataset_name": args.negative_dataset_name,
        "negative_ratio": args.negative_ratio, "own_negative_share": args.own_negative_share,
        "near_polyp_share": args.near_polyp_share,
        "closeup_probability": args.closeup_probability,
        "num_eval_negatives": sum(len(datasets[name]) for name in NEGATIVE_EVAL_SETS if datasets[name] is not None),
        "num_train_samples": len(datasets["train"]), "num_eval_samples": len(datasets["eval"]),
        "num_processes": accelerator.num_processes, "channels_last": args.channels_last,
        "torch_compile": args.torch_compile, "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def log_invocation(args: argparse.Namespace, accelerator: Accelerator, run_config: dict, argv: list[str] | None):
    """One line per invocation in `invocations.jsonl` (a run resumed in stages keeps the command of every stage), and
    the trackers' hyperparameters."""
    if accelerator.is_main_process:
        command = " ".join(["python train_accelerate.py", *(argv if argv is not None else sys.argv[1:])])
        with open(Path(args.output_dir) / INVOCATIONS_FILE, "a") as log_file:
            log_file.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
                                       **run_config}) + "\n")
    if args.report_to != "none":
        # TensorBoard's hparams take only scalars and strings.
        hparams = {k: "" if v is None else str(v) if isinstance(v, list) else v for k, v in run_config.items()}
        accelerator.init_trackers("attention_unet", hparams)


def validate_epoch(epoch: int, totals: EpochTotals, model, loaders: dict, accelerator: Accelerator, config,
                   args: argparse.Namespace, state: dict, lr_scheduler, full_frames: bool) -> dict:
    """Validates `model` after epoch `epoch` (validation split, training subset, polyp-free frames) and logs the
    epoch's record to the trackers, `metrics.jsonl` and the log."""
    eval_start = time.perf_counter()
    metrics = validate(model, loaders["eval"], accelerator, config.threshold, args.channels_last)
    train_metrics, negative_metrics = {}, {}
    if loaders["train_eval"] is not None:
        train_metrics = validate(model, loaders["train_eval"], accelerator, config.threshold, args.channels_last)
    negative_loaders = {name.removeprefix("eval_negatives_"): loaders[name] for name in NEGATIVE_EVAL_SETS
                        if loaders[name] is not None}
    if negative_loaders:
        negative_metrics = validate_polyp_free(model, negative_loaders, accelerator, config.threshold,
                                               args.channels_last)
    record = {
        "epoch": epoch + 1, "step": state["completed_steps"], "train_loss": totals.loss,
        "learning_rate": lr_scheduler.get_last_lr()[0],
        "train_image_size": args.resolution if full_frames or args.train_crop_size is None else args.train_crop_size,
        "train_images_per_second": totals.images_per_second,
        "data_seconds": totals.data_seconds, "model_seconds": totals.model_seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        **{f"eval_{name}": value for name, value in metrics.items()},
        **{f"train_eval_{name}": value for name, value in train_metrics.items()},
        **{f"eval_negatives_{name}": value for name, value in negative_metrics.items()},
        "selection_score": selection_score(metrics, negative_metrics),
    }
    accelerator.log(record, step=epoch + 1)
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / METRICS_FILE, "a") as log_file:
            log_file.write(json.dumps(record) + "\n")
    train_eval_text = f", training-subset mDice {train_metrics['mean_dice']:.4f}" if train_metrics else ""
    negative_text = ""
    if negative_metrics:
        by_source = ", ".join(f"{source} {negative_metrics[f'{source}_false_alarm_rate']:.3f}"
                              for source in negative_loaders)
        negative_text = f", false alarms on polyp-free frames {negative_metrics['false_alarm_rate']:.3f} ({by_source})"
    logger.info(f"epoch {epoch + 1}: train loss {totals.loss:.4f}{train_eval_text}, validation mDice "
                f"{metrics['mean_dice']:.4f}, loss {metrics['loss']:.4f}{negative_text}", main_process_only=True)
    return record


def finish_run(args: argparse.Namespace, accelerator: Accelerator, model, state: dict, pusher, num_train_epochs: int):
    """Checks the replicas, makes the final push and says which epoch was best."""
    if parameters_are_sharded(accelerator):
        logger.info("Parameters are sharded across processes: the replica check does not apply.")
    else:
        checksums = check_replicas_in_sync(model, accelerator)
        logger.info(f"Weights identical on all {len(checksums)} process(es): checksum {checksums[0]!r}.")
    if pusher is not None:
        if not pusher.finish(f"end of training: best validation mDice {state['best_dice']:.4f}"):
            logger.warning(f"The final push failed; {args.output_dir} is complete and can be pushed again.")
    accelerator.wait_for_everyone()
    # A run that went on from saved weights (a snapshot, --start_epoch) only compared the epochs it ran itself.
    first_epoch = state.get("first_epoch", 1)
    scope = "" if first_epoch == 1 else (f" of epochs {first_epoch}-{num_train_epochs} (this run went on from saved "
                                         f"weights at epoch {first_epoch - 1}; {METRICS_FILE} has every epoch)")
    logger.info(f"Best epoch {state['best_epoch']}{scope} (validation mDice {state['best_dice']:.4f}, "
                f"selection score {state.get('best_score', state['best_dice']):.4f}); model in {args.output_dir}.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = build_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    if args.float32_matmul_precision:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if accelerator.is_main_process:
        Path(args.output_dir, "checkpoints").mkdir(parents=True, exist_ok=True)
    continue_from_snapshot(args, accelerator)

    # Data and model.
    config, processor = load_config_and_processor(args)
    model = build_model(config, args)
    augment_on_device = accelerator.device.type == "cuda" if args.augment_on_device is None else args.augment_on_device
    datasets = build_datasets(args, processor, augment_on_device)
    loaders = build_dataloaders(args, accelerator, datasets)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # Optimiser and schedule, prepared by Accelerate.
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, accelerator.device.type)
    steps_per_epoch = math.ceil(len(loaders["train"]) / accelerator.num_processes / args.gradient_accumulation_steps)
    lr_scheduler, max_train_steps, num_train_epochs = build_lr_scheduler(args, accelerator, optimizer, steps_per_epoch)
    # One call with the DataLoaders: DeepSpeed takes its micro-batch size from them.
    names = [name for name, loader in loaders.items() if loader is not None]
    model, optimizer, lr_scheduler, *prepared = accelerator.prepare(
        model, optimizer, lr_scheduler, *(loaders[name] for name in names))
    loaders.update(zip(names, prepared))
    # Only the training step is compiled: it shares its parameters with `model`, which saves, validates and resumes
    # eagerly (whole images at evaluation would compile a second graph).
    training_model = model
    if args.torch_compile:
        training_model = torch.compile(model, mode=args.torch_compile_mode, backend=args.torch_compile_backend or "inductor")
    model_ema = build_model_ema(args, accelerator, model)
    evaluated_model = model if model_ema is None else model_ema.module

    # Where the run stands.
    run_config = describe_run(args, accelerator, config, datasets, max_train_steps, num_train_epochs)
    log_invocation(args, accelerator, run_config, argv)
    state = load_checkpoint(accelerator, args, model_ema) or {
        "epoch": args.start_epoch, "step_in_epoch": 0, "completed_steps": args.start_epoch * steps_per_epoch,
        "best_score": -1.0, "best_dice": -1.0, "best_epoch": None, "first_epoch": args.start_epoch + 1,
    }
    pusher = HubPusher(args) if args.push_to_hub and accelerator.is_main_process else None
    logger.info(f"{len(datasets['train'])} training / {len(datasets['eval'])} validation images, {num_train_epochs} "
                f"epochs, {max_train_steps} optimiser steps, {accelerator.num_processes} process(es) on "
                f"{accelerator.device}.")

    # The loop: train, validate, save.
    progress = tqdm(total=max_train_steps, initial=state["completed_steps"], disable=not accelerator.is_local_main_process)
    model.train()
    for epoch in range(state["epoch"], num_train_epochs):
        full_frames = epoch >= num_train_epochs - args.final_full_frame_epochs
        stage = "train_full_frame" if full_frames else "train"
        totals = train_one_epoch(
            epoch, datasets[stage], loaders[stage], training_model, model, optimizer, lr_scheduler, model_ema,
            accelerator, state, args, max_train_steps, progress,
            save_checkpoint=lambda position: save_checkpoint(accelerator, args, position, model, model_ema),
        )
        record = validate_epoch(epoch, totals, evaluated_model, loaders, accelerator, config, args, state,
                                lr_scheduler, full_frames)
        state.update(epoch=epoch + 1, step_in_epoch=0)
        # Checkpoints written before the selection score existed chose on the validation mDice alone.
        improved = record["selection_score"] > state.get("best_score", state["best_dice"])
        if improved:
            state.update(best_score=record["selection_score"], best_dice=record["eval_mean_dice"], best_epoch=epoch + 1)
            metrics = {name[len("eval_"):]: value for name, value in record.items()
                       if name.startswith("eval_") and not name.startswith("eval_negatives_") and name != "eval_seconds"}
            save_best_model(accelerator, evaluated_model, processor, args, {"epoch": epoch + 1, "eval": metrics},
                            run_config)
        if args.checkpointing_steps == "epoch" or state["completed_steps"] >= max_train_steps:
            save_checkpoint(accelerator, args, state, model, model_ema)
        if args.snapshot_dir:
            save_snapshot(accelerator, evaluated_model, processor, args, state)
        if pusher is not None and improved:
            pusher.push(f"epoch {epoch + 1}: validation mDice {record['eval_mean_dice']:.4f}")
        if state["completed_steps"] >= max_train_steps:
            break
    progress.close()
    finish_run(args, accelerator, model, state, pusher, num_train_epochs)
    # Last: it tears down the process group that `wait_for_everyone` needs.
    accelerator.end_training()


if __name__ == "__main__":
    main()
