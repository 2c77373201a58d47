"""Saving and resuming training runs: atomic checkpoints (Accelerate's state, the loop's position, the weights' moving
average), the best model and the snapshot as loadable model folders, and going on from a snapshot where the
checkpoints are gone."""

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file, save_file, save_model
from timm.utils import ModelEmaV3

from polyp_segmentation.metrics import format_table

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
METRICS_FILE = "metrics.jsonl"
INVOCATIONS_FILE = "invocations.jsonl"
MODEL_EMA_FILE = "model_ema.safetensors"


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


def cast_within_range(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state_dict` with its floating-point tensors in `dtype`, but for those beyond `dtype`'s range: cast, they would
    be saved as inf. BatchNorm's running variance after the concatenation of ConvNeXt's last features passes fp16's
    65504."""
    limit = torch.finfo(dtype).max
    return {name: t.to(dtype) if t.is_floating_point() and (t.numel() == 0 or t.abs().max() <= limit) else t
            for name, t in state_dict.items()}


def store_weights_in_float16(source: str | Path, target: str | Path) -> None:
    """Rewrites the safetensors file `source` as `target` with fp16 storage where it fits (`cast_within_range`): the
    shipped weights are stored so, and a config's dtype float32 loads them as float32."""
    tensors = load_file(str(source))
    save_file(cast_within_range(tensors, torch.float16), str(target), metadata={"format": "pt"})


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
        state_dict = cast_within_range(state_dict, dtype)
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

Best model of a `train_accelerate.py` run, chosen by its selection score (the validation mean Dice, averaged with the
share of polyp-free frames left quiet where the run validates on some), at epoch {metrics['epoch']}.

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

