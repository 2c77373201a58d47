"""The training loop's pieces: the optimiser (shared with benchmarks/bench_train.py, so that the benchmark times the
step the training script runs), the DataLoaders' settings, one epoch of training, validation, the selection score and
the checks on the loss and on the replicas."""

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from polyp_segmentation.checkpoints import find_latest_checkpoint
from polyp_segmentation.metrics import confusion_counts, false_alarm_summary, summarize

FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                    device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW without weight decay on biases and normalisation weights, as in transformers' and timm's recipes.

    On CPUs and CUDA GPUs it is PyTorch's fused implementation: on a CPU the default one loops over the tensors in
    Python (for-each is only the default on GPUs), 0.24 s against 0.02 s a step for this model's 32 M parameters on 2
    cores. `device_type` is where the parameters will be when the optimiser steps.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=True if device_type in FUSED_OPTIMIZER_DEVICES else None)


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


@torch.no_grad()
def predict_counts(model, dataloader, accelerator: Accelerator, threshold: float,
                   channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(N, 4)` confusion counts of every frame of `dataloader`, gathered from all processes, the summed loss
    (weighted by frames) and the number of frames."""
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
    return torch.cat(counts).cpu(), torch.cat(losses).sum().cpu(), torch.cat(weights).sum().cpu()


def validate(model, dataloader, accelerator: Accelerator, threshold: float, channels_last: bool = False
             ) -> dict[str, float]:
    """The metrics of `summarize` and the loss."""
    counts, loss_sum, frames = predict_counts(model, dataloader, accelerator, threshold, channels_last)
    return {**summarize(counts), "loss": (loss_sum / frames).item()}


def validate_polyp_free(model, dataloaders: dict[str, object], accelerator: Accelerator, threshold: float,
                        channels_last: bool = False) -> dict[str, float]:
    """`false_alarm_summary` and the loss over the polyp-free frames of all `dataloaders` (name -> loader) together,
    each loader's own false-alarm rate as `{name}_false_alarm_rate`, and their mean, `source_mean_false_alarm_rate`:
    sources differ (another centre's frames, crops of the polyp frames), and a target holds for each."""
    counts, loss_sum, frames, by_source = [], 0.0, 0.0, {}
    for name, dataloader in dataloaders.items():
        source_counts, source_loss, source_frames = predict_counts(model, dataloader, accelerator, threshold,
                                                                   channels_last)
        by_source[f"{name}_false_alarm_rate"] = false_alarm_summary(source_counts)["false_alarm_rate"]
        counts.append(source_counts)
        loss_sum, frames = loss_sum + source_loss, frames + source_frames
    return {**false_alarm_summary(torch.cat(counts)), "loss": (loss_sum / frames).item(), **by_source,
            "source_mean_false_alarm_rate": sum(by_source.values()) / len(by_source)}


def selection_score(metrics: dict[str, float], negative_metrics: dict[str, float]) -> float:
    """What the best model is chosen by: the validation mDice; with polyp-free validation frames, the mean of the
    mDice and the share of those frames left quiet (1 - the sources' mean false-alarm rate: each source counts alike,
    however many frames it has), so neither can be traded away unseen."""
    if not negative_metrics:
        return metrics["mean_dice"]
    return 0.5 * metrics["mean_dice"] + 0.5 * (1.0 - negative_metrics["source_mean_false_alarm_rate"])


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


@dataclass
class EpochTotals:
    """What an epoch of `train_one_epoch` adds up: the mean training loss over its optimiser steps (on every process),
    the frames it trained on, and the seconds spent waiting for data and in the model."""

    loss: float
    images_seen: int
    data_seconds: float
    model_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images_seen / max(self.data_seconds + self.model_seconds, 1e-9)


def train_one_epoch(epoch: int, dataset, dataloader, training_model, model, optimizer, lr_scheduler, model_ema,
                    accelerator: Accelerator, state: dict, args: argparse.Namespace, max_train_steps: int,
                    progress, save_checkpoint: Callable[[dict], None]) -> EpochTotals:
    """Trains `training_model` (`model`, compiled or not) for epoch `epoch`, from `state["step_in_epoch"]` (a resumed
    run skips the batches it already took). Updates `state["completed_steps"]` and the EMA of the weights at every
    optimiser step, checks the loss every `--logging_steps` steps, and calls `save_checkpoint(state)` every
    `--checkpointing_steps` steps; stops early at `max_train_steps`."""
    dataset.set_epoch(epoch)
    dataloader.set_epoch(epoch)
    skipped = state["step_in_epoch"] * args.gradient_accumulation_steps
    batches = accelerator.skip_first_batches(dataloader, skipped) if skipped else dataloader
    checkpoint_every = None if args.checkpointing_steps == "epoch" else int(args.checkpointing_steps)
    step_in_epoch = state["step_in_epoch"]
    loss_sum, loss_count, images_seen = torch.zeros((), device=accelerator.device), 0, 0
    window_loss_sum, window_count = torch.zeros((), device=accelerator.device), 0
    logged_step = state["completed_steps"]
    data_seconds = model_seconds = 0.0
    tick = time.perf_counter()
    for batch in batches:
        if not dataset.augment_on_access:
            batch = dataset.prepare_batch(batch, accelerator.device)
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
                progress.set_postfix(loss=f"{window:.4f}", img_s=f"{images_seen / (data_seconds + model_seconds):.2f}")
                logged_step = state["completed_steps"]
            if checkpoint_every and state["completed_steps"] % checkpoint_every == 0:
                save_checkpoint({**state, "epoch": epoch, "step_in_epoch": step_in_epoch})
            if state["completed_steps"] >= max_train_steps:
                break
    if window_count:
        check_window_loss(window_loss_sum, window_count, logged_step, state["completed_steps"], args.output_dir)
        loss_sum, loss_count = loss_sum + window_loss_sum, loss_count + window_count
    progress.update(state["completed_steps"] - logged_step)
    mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
    return EpochTotals(mean_loss, images_seen, data_seconds, model_seconds)
