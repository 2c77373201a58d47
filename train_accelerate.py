#!/usr/bin/env python
"""Trains the Attention U-Net on Kvasir-SEG (or any folder or Hub copy laid out like it) with Accelerate.

    accelerate launch train_accelerate.py --output_dir runs/seed                      # the seed recipe, on a GPU
    python train_accelerate.py --output_dir runs/cpu --per_device_train_batch_size 8  # same code on a CPU

The defaults are the seed recipe: AdamW at 1e-3, cosine decay with 5 % linear warm-up, weight decay 1e-4, batch 64,
50 epochs at 256x256, BCE + Dice (alpha 0.5), fp16, flips / rotation / colour jitter. The output folder is itself a
loadable Hub repository holding the best model by validation Dice.
"""

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from accelerate.utils import load as accelerate_load
import safetensors.torch
from safetensors.torch import load_file, save_model
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, get_scheduler

from segmentation_data import (
    DEFAULT_DATASET,
    DataError,
    PolypMixtureDataset,
    PolypSegmentationDataset,
    decode_samples,
    load_negative_splits,
    load_splits,
    polyp_free_crops,
    processor_normalization,
    training_augmentation,
)
from segmentation_inference import (
    add_float32_matmul_precision_argument, check_input_convention, check_remote_code_arguments, load_model,
)
from segmentation_metrics import confusion_counts, false_alarm_summary, format_table, summarize
from segmentation_training import build_optimizer

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
METRICS_FILE = "metrics.jsonl"
INVOCATIONS_FILE = "invocations.jsonl"
MODEL_EMA_FILE = "model_ema.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
                      help="Share of each epoch's training items that are polyp-free (default 0.25 with "
                           "--negative_dataset_name, else 0): frames of --negative_dataset_name and polyp-free crops "
                           "of the training frames themselves (--own_negative_share of them).")
    data.add_argument("--own_negative_share", type=float, default=0.5,
                      help="Of the polyp-free items, the share that are crops of the training frames away from their "
                           "polyp (black border and on-screen text included), so that the frames' layout cannot be "
                           "the cue (1.0 without --negative_dataset_name).")
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
        args.negative_ratio = 0.25 if args.negative_dataset_name else 0.0
    if not 0 <= args.negative_ratio < 1:
        parser.error(f"--negative_ratio must lie in [0, 1), got {args.negative_ratio}.")
    if not 0 <= args.own_negative_share <= 1 or not 0 <= args.closeup_probability <= 1:
        parser.error(f"--own_negative_share and --closeup_probability are probabilities, got "
                     f"{args.own_negative_share} and {args.closeup_probability}.")
    if not args.negative_dataset_name:
        args.own_negative_share = 1.0
    if args.model_ema_decay is not None and not 0 < args.model_ema_decay < 1:
        parser.error(f"--model_ema_decay must lie in (0, 1), got {args.model_ema_decay}.")
    return args


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
    config.image_size = args.resolution
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
                                   args.own_negative_share, args.closeup_probability, **settings)

    train = training_dataset(args.train_crop_size)
    # Same samples and seed, so the full-frame epochs draw their flips, rotations and colours as the cropped ones do.
    train_full_frame = training_dataset(None) if args.final_full_frame_epochs else None
    validation = PolypSegmentationDataset(*decoded["validation"], mean, std)
    validation_negatives = None
    if args.negative_ratio:
        # The polyp-free frames' validation split and fixed polyp-free crops of the validation frames.
        frames = negatives["validation"] + polyp_free_crops(decoded["validation"][1], decoded["validation"][2])
        validation_negatives = PolypSegmentationDataset(
            [str(i) for i in range(len(frames))], frames, [torch.zeros(f.shape[-2:], dtype=torch.bool) for f in frames],
            mean, std)
    train_eval = None
    if args.train_eval_samples:
        names, images, masks = decoded["train"]
        count = min(args.train_eval_samples, len(names))
        picked = [round(i * (len(names) - 1) / max(count - 1, 1)) for i in range(count)]
        train_eval = PolypSegmentationDataset([names[i] for i in picked], [images[i] for i in picked],
                                              [masks[i] for i in picked], mean, std)
    return train, train_full_frame, validation, train_eval, validation_negatives


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


def dataloader_settings(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """Workers and pinned memory for the training DataLoaders. Workers are not persistent: each epoch's must start
    from the dataset after `set_epoch`, or they would draw the first epoch's augmentations again."""
    on_gpu = accelerator.device.type == "cuda"
    workers = args.dataloader_num_workers
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 1) // accelerator.num_processes)) if on_gpu else 0
    # Their own generator: a new iterator draws its workers' base seed from it, not from the global RNG that
    # stochastic depth draws from, so a run resumed mid-epoch (a new iterator) keeps the global RNG's sequence.
    generator = torch.Generator().manual_seed(args.seed)
    return {"num_workers": workers, "pin_memory": on_gpu, "generator": generator}


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first: they are renamed from `*.partial` only once whole."""
    folder = Path(output_dir) / "checkpoints"
    step = lambda path: path.name[len(CHECKPOINT_PREFIX):]  # noqa: E731
    return sorted((p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if step(p).isdigit()), key=lambda p: int(step(p)))


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    # torch.save and safetensors report a full disk as RuntimeError / SafetensorError ("unexpected pos ...", "file
    # write failed"), not as OSError(ENOSPC), so the free space is the reliable witness.
    text = str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


@contextlib.contextmanager
def writing(target: Path, intact: str):
    """Removes a half-written `target` on failure and turns a full disk into an error that says what is intact."""
    try:
        yield
    except Exception as error:
        disk_full = _is_disk_full(error, target.parent)
        shutil.rmtree(target, ignore_errors=True)
        if disk_full:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while writing {target}; {intact} is intact. Free some space, then resume "
                "with --resume_from_checkpoint latest.",
            ) from error
        raise


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, state: dict, model,
                    model_ema: ModelEmaV3 | None) -> None:
    """`accelerator.save_state` plus the loop's position (and the weights' moving average), into a temporary folder
    renamed when complete, so a kill or a full disk never leaves a half-written checkpoint for `latest` to pick."""
    # Every process checks its own (possibly sharded) parameters and all agree, so that none waits alone below.
    finite = all(torch.isfinite(p).all() for p in accelerator.unwrap_model(model).parameters())
    if accelerator.gather(torch.tensor([float(finite)], device=accelerator.device)).min() < 1:
        raise FloatingPointError(
            f"Non-finite weights at optimiser step {state['completed_steps']}: not saving them. The last good "
            f"checkpoint is {find_latest_checkpoint(args.output_dir)}. Lower --learning_rate or use fp32."
        )
    folder = Path(args.output_dir) / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{state['completed_steps']}"
    partial = folder / f"{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(partial, f"the previous checkpoint ({find_latest_checkpoint(args.output_dir)})"):
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            (partial / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
            if model_ema is not None:
                save_model(model_ema.module, str(partial / MODEL_EMA_FILE))
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.save_total_limit:
            for old in list_checkpoints(args.output_dir)[: -args.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(
    accelerator: Accelerator, args: argparse.Namespace, model_ema: ModelEmaV3 | None
) -> dict | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoint = find_latest_checkpoint(args.output_dir)
        if checkpoint is None:
            logger.info(f"No checkpoint in {args.output_dir}/checkpoints yet: starting from scratch.")
            return None
    else:
        checkpoint = Path(args.resume_from_checkpoint)
    if not (checkpoint / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: it has no {TRAINING_STATE_FILE}.")
    # accelerate skips an unreadable random-state file with an info-level log only ("Could not load random states"):
    # a damaged or tampered checkpoint must stop the resume. `accelerate.utils.load` is accelerate's weights-only loader.
    rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if rng_file.exists():
        try:
            accelerate_load(rng_file)
        except Exception as error:
            raise ValueError(f"{rng_file}: not a random-state file written by accelerate ({error}).") from error
    if model_ema is not None and not (checkpoint / MODEL_EMA_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint} has no {MODEL_EMA_FILE}: it was saved without --model_ema_decay, so "
                                "the moving average cannot be resumed. Resume without --model_ema_decay.")
    accelerator.load_state(str(checkpoint))
    if model_ema is not None:
        safetensors.torch.load_model(model_ema.module, str(checkpoint / MODEL_EMA_FILE), device=str(accelerator.device))
    state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
    logger.info(f"Resumed from {checkpoint}: epoch {state['epoch']}, step {state['completed_steps']}.")
    return state


def recompute_non_finite_batch_norm_statistics(model, dataset: PolypSegmentationDataset, args: argparse.Namespace,
                                                device: torch.device, num_batches: int = 25) -> list[str]:
    """Recomputes, from training batches, the running statistics of every BatchNorm layer of `model` whose statistics
    are not finite, and leaves every other tensor and the random state as they were; returns those layers' names.

    Training normalises with each batch's own statistics, so such a layer still trains, but validation, the EMA of
    the weights and every saved model would be NaN (snapshots before the fp16 fix stored one variance as inf)."""
    norms = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats}
    broken = {name for name, module in norms.items()
              if not (torch.isfinite(module.running_mean).all() and torch.isfinite(module.running_var).all())}
    if not broken:
        return []
    kept = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    momenta = {name: module.momentum for name, module in norms.items()}
    for name in broken:
        norms[name].reset_running_stats()
        norms[name].momentum = None  # a cumulative average over the batches below
    was_training = model.training
    model.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.per_device_train_batch_size)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
        for index, batch in enumerate(loader):
            if index == num_batches:
                break
            if not dataset.augment_on_access:
                batch = dataset.prepare_batch(batch, device)
            pixel_values = batch["pixel_values"].to(device)
            if args.channels_last:
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            model(pixel_values=pixel_values)
    recomputed = {f"{name}.{buffer}" for name in broken for buffer in ("running_mean", "running_var")}
    model.load_state_dict({name: tensor for name, tensor in kept.items() if name not in recomputed}, strict=False)
    for name, momentum in momenta.items():
        norms[name].momentum = momentum
    model.train(was_training)
    return sorted(broken)


def repair_batch_norm_statistics(accelerator: Accelerator, model, model_ema: ModelEmaV3 | None,
                                 dataset: PolypSegmentationDataset, args: argparse.Namespace) -> None:
    """Recomputes the non-finite BatchNorm statistics of the weights a run starts from, and of their EMA."""
    loaded = {"model": accelerator.unwrap_model(model)}
    if model_ema is not None:
        loaded["EMA of the weights"] = model_ema.module
    for name, module in loaded.items():
        if broken := recompute_non_finite_batch_norm_statistics(module, dataset, args, accelerator.device):
            logger.warning(f"BatchNorm statistics of the {name} in {', '.join(broken)} were not finite: "
                           "recomputed from training batches.", main_process_only=True)


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, threshold: float, channels_last: bool = False,
             polyp_free: bool = False) -> dict[str, float]:
    """The metrics of `summarize` and the loss; for `polyp_free` frames, `false_alarm_summary`'s instead."""
    was_training = model.training
    model.eval()
    counts, losses, weights = [], [], []
    for batch in dataloader:
        if channels_last:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
        outputs = model(**batch)
        predictions = outputs.logits.float().sigmoid() > threshold
        counts.append(accelerator.gather_for_metrics(confusion_counts(predictions, batch["labels"][:, None])))
        batch_size = torch.tensor([len(batch["labels"])], device=accelerator.device, dtype=torch.float32)
        losses.append(accelerator.gather_for_metrics(outputs.loss.detach().float()[None] * batch_size))
        weights.append(accelerator.gather_for_metrics(batch_size))
    model.train(was_training)
    summary = (false_alarm_summary if polyp_free else summarize)(torch.cat(counts).cpu())
    summary["loss"] = (torch.cat(losses).sum() / torch.cat(weights).sum()).item()
    return summary


def selection_score(metrics: dict[str, float], negative_metrics: dict[str, float]) -> float:
    """What the best model is chosen by: the validation mDice; with polyp-free validation frames, the mean of the
    mDice and the share of those frames left quiet (1 - false-alarm rate), so neither can be traded away unseen."""
    if not negative_metrics:
        return metrics["mean_dice"]
    return 0.5 * metrics["mean_dice"] + 0.5 * (1.0 - negative_metrics["false_alarm_rate"])


def save_model_folder(accelerator: Accelerator, model, processor, folder: Path, what: str,
                      extra_files: dict[str, str], dtype: torch.dtype | None = None) -> None:
    """Writes `model` (in `dtype`, if given), `processor` and `extra_files` (name -> text) into `folder`, a loadable
    Hub repository: every file goes to a temporary folder first and is moved into place with an atomic rename, the
    weights last. Every process must call it: under FSDP and DeepSpeed ZeRO-3 gathering the weights takes all of
    them; the main process writes."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    if dtype is not None:
        # A tensor beyond `dtype`'s range stays as it is: cast, it would be saved as inf. BatchNorm's running variance
        # after the concatenation of ConvNeXt's last features passes fp16's 65504.
        limit = torch.finfo(dtype).max
        state_dict = {name: t.to(dtype) if t.is_floating_point() and (t.numel() == 0 or t.abs().max() <= limit)
                      else t for name, t in state_dict.items()}
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{what.replace(' ', '_')}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with writing(staging, f"the previous {what} in {folder}"):
        accelerator.unwrap_model(model).save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        processor.save_pretrained(staging)
        for name, text in extra_files.items():
            (staging / name).write_text(text)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "model.safetensors"):
        os.replace(path, folder / path.name)
    staging.rmdir()


def save_best_model(accelerator: Accelerator, model, processor, args, metrics: dict, run_config: dict) -> None:
    """The best model so far, into `--output_dir`, which is then a Hub repository."""
    save_model_folder(accelerator, model, processor, Path(args.output_dir), "best model", {
        "README.md": render_run_card(args, metrics, run_config), "eval_results.json": json.dumps(metrics, indent=2),
    })


def save_snapshot(accelerator: Accelerator, model, processor, args, state: dict) -> None:
    """The validated weights in fp16 (tensors beyond its range in fp32), the run's logs and `state` (its place in the
    schedule), into `--snapshot_dir`."""
    logs = {name: (Path(args.output_dir) / name).read_text() if accelerator.is_main_process else ""
            for name in (METRICS_FILE, INVOCATIONS_FILE)}
    save_model_folder(accelerator, model, processor, Path(args.snapshot_dir), "snapshot",
                      {**logs, TRAINING_STATE_FILE: json.dumps(state, indent=2)}, dtype=torch.float16)


def continue_from_snapshot(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Where `--resume_from_checkpoint latest` finds no checkpoint in `--output_dir` but `--snapshot_dir` holds one,
    the run goes on from the snapshot's weights at its epoch (as `--init_from` with `--start_epoch` would), with its
    logs carried over so that `metrics.jsonl` keeps the whole run."""
    snapshot = Path(args.snapshot_dir or "")
    if (args.resume_from_checkpoint != "latest" or not args.snapshot_dir or find_latest_checkpoint(args.output_dir)
            or not (snapshot / TRAINING_STATE_FILE).is_file()):
        return
    state = json.loads((snapshot / TRAINING_STATE_FILE).read_text())
    if state["step_in_epoch"] != 0:
        raise ValueError(f"{snapshot / TRAINING_STATE_FILE}: a snapshot is taken between epochs, this one is not.")
    args.init_from, args.init_encoder_from = str(snapshot), None
    args.resume_from_checkpoint, args.start_epoch = None, state["epoch"]
    if accelerator.is_main_process:
        for name in (METRICS_FILE, INVOCATIONS_FILE):
            if not (Path(args.output_dir) / name).exists():
                shutil.copyfile(snapshot / name, Path(args.output_dir) / name)
    accelerator.wait_for_everyone()
    logger.warning(f"No checkpoint in {args.output_dir}/checkpoints: continuing from the snapshot in {snapshot} at "
                   f"epoch {state['epoch']} (step {state['completed_steps']}); the optimiser's moments start afresh.",
                   main_process_only=True)


def render_run_card(args: argparse.Namespace, metrics: dict, run_config: dict) -> str:
    command = " ".join(["python train_accelerate.py", *sys.argv[1:]])
    return f"""---
library_name: transformers
pipeline_tag: image-segmentation
tags:
- medical-imaging
- polyp-segmentation
- attention-unet
datasets:
- kowndinya23/Kvasir-SEG
---

# Attention U-Net for polyp segmentation (training run output)

Best model of a `train_accelerate.py` run, chosen by validation mean Dice, at epoch {metrics['epoch']}.

## Validation results ({run_config['num_eval_samples']} images, {args.resolution}x{args.resolution})

{format_table(metrics['eval'], metrics['eval']['loss'])}

"Mean over images" is the polyp literature's mDice / mIoU; "pooled" counts every pixel of the split once.

## Training configuration

```json
{json.dumps(run_config, indent=2)}
```

Reproduce with:

```bash
{command}
```

Load with `AutoModel.from_pretrained(<this repo>, trust_remote_code=True)`.
"""


def check_window_loss(loss_sum: torch.Tensor, count: int, last_logged_step: int, step: int, output_dir) -> float:
    """The mean training loss of optimiser steps `last_logged_step + 1` to `step`, read on the host once for all of
    them; raises `FloatingPointError` naming those steps and the last good checkpoint if it is not finite."""
    value = loss_sum.item() / max(count, 1)
    if not math.isfinite(value):
        raise FloatingPointError(
            f"Non-finite training loss ({value}) between optimiser steps {last_logged_step + 1} and {step}; the last "
            f"good checkpoint is {find_latest_checkpoint(output_dir)}. Lower --learning_rate or use fp32."
        )
    return value


def parameters_are_sharded(accelerator: Accelerator) -> bool:
    """Whether each process holds only part of the parameters (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


def check_replicas_in_sync(model, accelerator: Accelerator) -> list[float]:
    """Every process's float64 sum of the weights; raises if data-parallel replicas have drifted apart."""
    with torch.no_grad():
        checksum = sum(p.double().sum() for p in accelerator.unwrap_model(model).parameters())
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    if any(value != checksums[0] for value in checksums):
        raise RuntimeError(f"The {len(checksums)} processes ended with different weights (checksums {checksums}).")
    return checksums


class HubPusher:
    """Pushes `--output_dir` to the Hub in the background. A push never blocks training; a failed one is reported
    and retried at the next call once its back-off has passed, and the local folder is never touched."""

    def __init__(self, args: argparse.Namespace):
        from huggingface_hub import HfApi

        self.api = HfApi(token=args.hub_token)
        self.repo_id = args.hub_model_id
        self.folder = Path(args.output_dir)
        self.private = args.hub_private_repo
        self.future = None
        self.failures = 0
        self.retry_after = 0.0
        self.repo_created = False

    def _collect(self) -> None:
        if self.future is None or not self.future.done():
            return
        error = self.future.exception()
        self.future = None
        if error is None:
            self.failures = 0
            return
        self.failures += 1
        backoff = min(30.0 * 2 ** (self.failures - 1), 600.0)
        self.retry_after = time.monotonic() + backoff
        print(f"warning: push to {self.repo_id} failed ({error}); will retry at the next push after {backoff:.0f} s. "
              f"The local copy in {self.folder} is complete.", file=sys.stderr)

    def push(self, message: str) -> None:
        self._collect()
        if self.future is not None or time.monotonic() < self.retry_after:
            return
        try:
            if not self.repo_created:
                self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                self.repo_created = True
            snapshot = self._snapshot()
            self.future = self.api.upload_folder(
                repo_id=self.repo_id, folder_path=snapshot, commit_message=message, run_as_future=True
            )
        except Exception as error:  # a refused or dropped connection must not stop training
            from concurrent.futures import Future

            self.future = Future()
            self.future.set_exception(error)
            self._collect()

    def _snapshot(self) -> Path:
        # Hard links freeze the files being uploaded: the best model is replaced by renames, never rewritten.
        snapshot = self.folder / ".hub_snapshot"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir()
        for path in self.folder.iterdir():
            if path.is_file():
                os.link(path, snapshot / path.name)
        return snapshot

    def finish(self, message: str, attempts: int = 3) -> bool:
        """Waits for the running push, then pushes the final state, retrying with back-off. Returns success."""
        for attempt in range(attempts):
            if self.future is not None:
                try:
                    self.future.result()
                except Exception as error:
                    print(f"warning: push to {self.repo_id} failed ({error}).", file=sys.stderr)
                self.future = None
            self.retry_after = 0.0
            self.push(message)
            if self.future is None:
                time.sleep(2**attempt)
                continue
            try:
                self.future.result()
                self.future = None
                shutil.rmtree(self.folder / ".hub_snapshot", ignore_errors=True)
                return True
            except Exception as error:
                print(f"warning: final push to {self.repo_id} failed ({error}).", file=sys.stderr)
                self.future = None
                time.sleep(2**attempt)
        return False


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

    config, processor = load_config_and_processor(args)
    model = build_model(config, args)
    augment_on_device = args.augment_on_device
    if augment_on_device is None:
        augment_on_device = accelerator.device.type == "cuda"
    train_dataset, train_full_frame_dataset, eval_dataset, train_eval_dataset, eval_negative_dataset = build_datasets(
        args, processor, augment_on_device
    )
    train_dataloader, train_full_frame_dataloader = (
        None if dataset is None else torch.utils.data.DataLoader(
            dataset, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True,
            **dataloader_settings(args, accelerator),
        )
        for dataset in (train_dataset, train_full_frame_dataset)
    )
    eval_dataloader, train_eval_dataloader, eval_negative_dataloader = (
        None if dataset is None else torch.utils.data.DataLoader(dataset, batch_size=args.per_device_eval_batch_size)
        for dataset in (eval_dataset, train_eval_dataset, eval_negative_dataset)
    )
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, accelerator.device.type)

    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
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
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    if train_full_frame_dataloader is not None:
        train_full_frame_dataloader = accelerator.prepare(train_full_frame_dataloader)
    if train_eval_dataloader is not None:
        train_eval_dataloader = accelerator.prepare(train_eval_dataloader)
    if eval_negative_dataloader is not None:
        eval_negative_dataloader = accelerator.prepare(eval_negative_dataloader)
    # Only the training step is compiled: it shares its parameters with `model`, which saves, validates and resumes
    # eagerly (whole images at evaluation would compile a second graph).
    training_model = model
    if args.torch_compile:
        training_model = torch.compile(model, mode=args.torch_compile_mode, backend=args.torch_compile_backend or "inductor")
    # Validated and saved in place of the raw weights; every process keeps an identical copy.
    if args.model_ema_decay is not None and parameters_are_sharded(accelerator):
        raise ValueError("--model_ema_decay keeps a full copy of the weights on every process, which FSDP and "
                         "DeepSpeed ZeRO-3 shard: train without it there, or with DDP / ZeRO-1/2.")
    model_ema = None if args.model_ema_decay is None else ModelEmaV3(
        accelerator.unwrap_model(model), args.model_ema_decay, use_warmup=args.model_ema_warmup
    )
    evaluated_model = model if model_ema is None else model_ema.module

    run_config = {
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
        "closeup_probability": args.closeup_probability,
        "num_eval_negatives": len(eval_negative_dataset) if eval_negative_dataset is not None else 0,
        "num_train_samples": len(train_dataset), "num_eval_samples": len(eval_dataset),
        "num_processes": accelerator.num_processes, "channels_last": args.channels_last,
        "torch_compile": args.torch_compile, "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if accelerator.is_main_process:
        command = " ".join(["python train_accelerate.py", *(argv if argv is not None else sys.argv[1:])])
        # One line per invocation: a run resumed in stages keeps the command of every stage.
        with open(Path(args.output_dir) / INVOCATIONS_FILE, "a") as log_file:
            log_file.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
                                       **run_config}) + "\n")
    if args.report_to != "none":
        # TensorBoard's hparams take only scalars and strings.
        hparams = {k: "" if v is None else str(v) if isinstance(v, list) else v for k, v in run_config.items()}
        accelerator.init_trackers("attention_unet", hparams)

    state = load_checkpoint(accelerator, args, model_ema)
    repair_batch_norm_statistics(accelerator, model, model_ema, train_dataset, args)
    state = state or {
        "epoch": args.start_epoch, "step_in_epoch": 0, "completed_steps": args.start_epoch * steps_per_epoch,
        "best_score": -1.0, "best_dice": -1.0, "best_epoch": None, "first_epoch": args.start_epoch + 1,
    }
    pusher = HubPusher(args) if args.push_to_hub and accelerator.is_main_process else None
    checkpoint_every = None if args.checkpointing_steps == "epoch" else int(args.checkpointing_steps)
    logger.info(f"{len(train_dataset)} training / {len(eval_dataset)} validation images, {num_train_epochs} epochs, "
                f"{max_train_steps} optimiser steps, {accelerator.num_processes} process(es) on {accelerator.device}.")

    progress = tqdm(total=max_train_steps, initial=state["completed_steps"], disable=not accelerator.is_local_main_process)
    model.train()
    for epoch in range(state["epoch"], num_train_epochs):
        full_frames = epoch >= num_train_epochs - args.final_full_frame_epochs
        epoch_dataset = train_full_frame_dataset if full_frames else train_dataset
        epoch_dataloader = train_full_frame_dataloader if full_frames else train_dataloader
        epoch_dataset.set_epoch(epoch)
        epoch_dataloader.set_epoch(epoch)
        skipped = state["step_in_epoch"] * args.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(epoch_dataloader, skipped) if skipped else epoch_dataloader
        step_in_epoch = state["step_in_epoch"]
        loss_sum, loss_count, images_seen = torch.zeros((), device=accelerator.device), 0, 0
        window_loss_sum, window_count = torch.zeros((), device=accelerator.device), 0
        logged_step = state["completed_steps"]
        data_seconds = model_seconds = 0.0
        tick = time.perf_counter()
        for batch in batches:
            if not epoch_dataset.augment_on_access:
                batch = epoch_dataset.prepare_batch(batch, accelerator.device)
            loaded = time.perf_counter()
            data_seconds += loaded - tick
            if args.channels_last:
                batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                outputs = training_model(**batch)
                loss = outputs.loss
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            # Summed on the device: reading a loss on the host every step would stall a GPU's queue.
            window_loss_sum += loss.detach().float()
            window_count += 1
            images_seen += len(batch["labels"]) * accelerator.num_processes
            tick = time.perf_counter()
            model_seconds += tick - loaded
            if accelerator.sync_gradients:
                step_in_epoch += 1
                state["completed_steps"] += 1
                if model_ema is not None:
                    model_ema.update(accelerator.unwrap_model(model), step=state["completed_steps"])
                if state["completed_steps"] % args.logging_steps == 0:
                    window = check_window_loss(window_loss_sum, window_count, logged_step, state["completed_steps"],
                                               args.output_dir)
                    loss_sum, loss_count = loss_sum + window_loss_sum, loss_count + window_count
                    window_loss_sum, window_count = torch.zeros_like(window_loss_sum), 0
                    progress.update(state["completed_steps"] - logged_step)
                    progress.set_postfix(loss=f"{window:.4f}",
                                         img_s=f"{images_seen / (data_seconds + model_seconds):.2f}")
                    logged_step = state["completed_steps"]
                if checkpoint_every and state["completed_steps"] % checkpoint_every == 0:
                    save_checkpoint(accelerator, args, {**state, "epoch": epoch, "step_in_epoch": step_in_epoch}, model,
                                    model_ema)
                if state["completed_steps"] >= max_train_steps:
                    break

        if window_count:
            check_window_loss(window_loss_sum, window_count, logged_step, state["completed_steps"], args.output_dir)
            loss_sum, loss_count = loss_sum + window_loss_sum, loss_count + window_count
        progress.update(state["completed_steps"] - logged_step)
        logged_step = state["completed_steps"]
        eval_start = time.perf_counter()
        metrics = evaluate(evaluated_model, eval_dataloader, accelerator, config.threshold, args.channels_last)
        train_metrics = {}
        if train_eval_dataloader is not None:
            train_metrics = evaluate(evaluated_model, train_eval_dataloader, accelerator, config.threshold,
                                     args.channels_last)
        negative_metrics = {}
        if eval_negative_dataloader is not None:
            negative_metrics = evaluate(evaluated_model, eval_negative_dataloader, accelerator, config.threshold,
                                        args.channels_last, polyp_free=True)
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
        record = {
            "epoch": epoch + 1, "step": state["completed_steps"], "train_loss": train_loss,
            "learning_rate": lr_scheduler.get_last_lr()[0],
            "train_image_size": args.resolution if full_frames or args.train_crop_size is None else args.train_crop_size,
            "train_images_per_second": images_seen / max(data_seconds + model_seconds, 1e-9),
            "data_seconds": data_seconds, "model_seconds": model_seconds,
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
        negative_text = (f", false alarms on polyp-free frames {negative_metrics['false_alarm_rate']:.3f}"
                         if negative_metrics else "")
        logger.info(f"epoch {epoch + 1}: train loss {train_loss:.4f}{train_eval_text}, validation mDice "
                    f"{metrics['mean_dice']:.4f}, loss {metrics['loss']:.4f}{negative_text}", main_process_only=True)

        state.update(epoch=epoch + 1, step_in_epoch=0)
        # Checkpoints written before the selection score existed chose on the validation mDice alone.
        improved = record["selection_score"] > state.get("best_score", state["best_dice"])
        if improved:
            state.update(best_score=record["selection_score"], best_dice=metrics["mean_dice"], best_epoch=epoch + 1)
            save_best_model(accelerator, evaluated_model, processor, args, {"epoch": epoch + 1, "eval": metrics},
                            run_config)
        if args.checkpointing_steps == "epoch" or state["completed_steps"] >= max_train_steps:
            save_checkpoint(accelerator, args, state, model, model_ema)
        if args.snapshot_dir:
            save_snapshot(accelerator, evaluated_model, processor, args, state)
        if pusher is not None and improved:
            pusher.push(f"epoch {epoch + 1}: validation mDice {metrics['mean_dice']:.4f}")
        if state["completed_steps"] >= max_train_steps:
            break

    progress.close()
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
    logger.info(f"Best validation mDice {state['best_dice']:.4f} at epoch {state['best_epoch']}{scope}; model in "
                f"{args.output_dir}.")
    # Last: it tears down the process group that `wait_for_everyone` needs.
    accelerator.end_training()


if __name__ == "__main__":
    main()
