"""Training survives bad data, kills, a full disk and divergence, losing nothing already saved."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from safetensors.torch import load_file

from polyp_segmentation.data import DataError, load_local_splits
from polyp_segmentation.testing import (
    REPO_ROOT,
    TINY_CONFIG_OVERRIDES,
    assert_same_weights,
    final_weights,
    run_training,
)


@pytest.fixture
def small_dataset(kvasir_root, tmp_path) -> Path:
    """A copy of 12 training, 4 validation and 4 test samples of Kvasir-SEG, to be damaged by the tests."""
    root = tmp_path / "data"
    splits, _ = load_local_splits(kvasir_root)
    (root / "splits").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for split, count in {"train": 12, "validation": 4, "test": 4}.items():
        samples = splits[split][:count]
        for sample in samples:
            shutil.copy(sample.image, root / "images")
            shutil.copy(sample.mask, root / "masks")
        (root / "splits" / f"{split}.txt").write_text("\n".join(s.name for s in samples) + "\n")
    return root


def train_command(data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--dataset_name", str(data),
        "--output_dir", str(output_dir), "--config_overrides", TINY_CONFIG_OVERRIDES, "--resolution", "64",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--seed", "7", *extra,
    ]


def damage(root: Path) -> dict[str, str]:
    """Five kinds of bad sample; returns the file each error message must name."""
    train = (root / "splits" / "train.txt").read_text().split()
    corrupt, truncated, mismatched, maskless = train[:4]
    (root / "images" / f"{corrupt}.jpg").write_bytes(b"not a jpeg at all")
    data = (root / "masks" / f"{truncated}.jpg").read_bytes()
    (root / "masks" / f"{truncated}.jpg").write_bytes(data[: len(data) // 3])
    PIL.Image.new("L", (10, 10)).save(root / "masks" / f"{mismatched}.jpg")
    (root / "masks" / f"{maskless}.jpg").unlink()
    (root / "splits" / "validation.txt").write_text((root / "splits" / "validation.txt").read_text() + "ghost\n")
    return {"corrupt": f"{corrupt}.jpg", "truncated": f"{truncated}", "mismatched": f"{mismatched}",
            "maskless": f"{maskless}.jpg: no mask", "missing": "'ghost'"}


def test_bad_samples_stop_training_with_one_error_naming_each(small_dataset, tmp_path):
    expected = damage(small_dataset)
    completed = subprocess.run(train_command(small_dataset, tmp_path / "out", "--num_train_epochs", "1"),
                               capture_output=True, text=True)
    assert completed.returncode != 0
    assert "DataError: 5 unusable sample(s)" in completed.stderr
    for name in expected.values():
        assert name in completed.stderr
    assert not list((tmp_path / "out" / "checkpoints").glob("checkpoint-*")), "training must not have started"


def test_skip_bad_samples_lists_counts_and_leaves_them_out(small_dataset, tmp_path):
    damage(small_dataset)
    completed = subprocess.run(
        train_command(small_dataset, tmp_path / "out", "--num_train_epochs", "1", "--skip_bad_samples"),
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Leaving out 5 unusable sample(s)" in completed.stderr
    assert "8 training / 4 validation images" in completed.stderr  # 12 less the 4 damaged; the ghost never existed


def test_empty_images_folder_is_a_clear_error(tmp_path):
    for name in ("images", "masks", "splits"):
        (tmp_path / name).mkdir()
    with pytest.raises(DataError, match="images holds no images"):
        load_local_splits(tmp_path)


def test_non_finite_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(small_dataset, tmp_path):
    output_dir = tmp_path / "out"
    completed = subprocess.run(
        train_command(small_dataset, output_dir, "--num_train_epochs", "3", "--learning_rate", "1e30",
                      "--warmup_ratio", "0", "--checkpointing_steps", "1"),
        capture_output=True, text=True,
    )
    assert completed.returncode != 0
    assert "Non-finite" in completed.stderr and "optimiser step" in completed.stderr
    for checkpoint in (output_dir / "checkpoints").glob("checkpoint-*"):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(np.isfinite(t.numpy()).all() for t in weights.values()), f"{checkpoint} holds non-finite weights"


def test_non_finite_loss_is_caught_at_the_logging_interval_naming_the_steps(small_dataset, tmp_path):
    """The step loop reads the loss on the host only every `--logging_steps`: a NaN is still caught there."""
    completed = subprocess.run(
        train_command(small_dataset, tmp_path / "out", "--num_train_epochs", "3", "--learning_rate", "1e30",
                      "--warmup_ratio", "0", "--logging_steps", "2"),
        capture_output=True, text=True,
    )
    assert completed.returncode != 0
    assert "Non-finite training loss" in completed.stderr
    assert "between optimiser steps 1 and 2" in completed.stderr and "last good checkpoint is None" in completed.stderr


@pytest.fixture(scope="module")
def reference_run(kvasir_root, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference")
    run_training(output_dir, kvasir_root, "--num_train_epochs", "3", "--checkpointing_steps", "2")
    return output_dir


def start_training(kvasir_root: Path, output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--dataset_name", str(kvasir_root),
        "--output_dir", str(output_dir), "--config_overrides", TINY_CONFIG_OVERRIDES, "--resolution", "64",
        "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--seed", "7", "--num_train_epochs", "3", "--checkpointing_steps", "2", *extra,
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"training ended before the kill: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting to kill training"
        time.sleep(0.002)


def test_sigkill_during_an_epoch_then_resume_latest_gives_the_same_weights(reference_run, kvasir_root, tmp_path):
    process = start_training(kvasir_root, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-4").is_dir(), process)
    time.sleep(random.uniform(0.0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "3", "--checkpointing_steps", "2",
                 "--resume_from_checkpoint", "latest")
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_sigkill_during_a_checkpoint_write_leaves_nothing_for_latest_to_pick(reference_run, kvasir_root, tmp_path):
    process = start_training(kvasir_root, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-6.partial").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (checkpoints / "checkpoint-6").exists(), "the kill came too late to hit the write"
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "3", "--checkpointing_steps", "2",
                 "--resume_from_checkpoint", "latest")
    assert_same_weights(final_weights(tmp_path), final_weights(reference_run))


def test_save_total_limit_keeps_the_newest_checkpoints_and_the_best_model(reference_run, kvasir_root, tmp_path):
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "3", "--checkpointing_steps", "2",
                 "--save_total_limit", "2")
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["checkpoint-10", "checkpoint-12"]
    best_epoch = json.loads((tmp_path / "eval_results.json").read_text())["epoch"]
    assert (tmp_path / "model.safetensors").is_file() and best_epoch >= 1


@pytest.fixture
def mount_small_disk(tmp_path):
    """Mounts a tmpfs of a given size, so the disk really fills up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()

    def mount(size_bytes: int) -> Path:
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(mount_point)]
        mounted = subprocess.run(command, capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
        return mount_point

    yield mount
    subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(reference_run, kvasir_root, mount_small_disk):
    checkpoint = sum(f.stat().st_size for f in (reference_run / "checkpoints" / "checkpoint-2").iterdir())
    best_model = sum(f.stat().st_size for f in reference_run.iterdir() if f.is_file())
    # Room for the best model and one checkpoint, not for a second checkpoint.
    output_dir = mount_small_disk(best_model + checkpoint + checkpoint // 3) / "out"
    completed = subprocess.run(
        train_command(kvasir_root, output_dir, "--max_train_samples", "16", "--max_eval_samples", "8",
                      "--num_train_epochs", "3", "--checkpointing_steps", "2"),
        capture_output=True, text=True,
    )
    assert completed.returncode != 0
    assert "No space left on device while writing" in completed.stderr
    assert "is intact" in completed.stderr
    checkpoints = list((output_dir / "checkpoints").iterdir())
    assert checkpoints and not [p for p in checkpoints if p.name.endswith(".partial")]
    for kept in checkpoints:
        assert (kept / "training_state.json").is_file()
        load_file(kept / "model.safetensors")


def test_unpaired_files_are_named_in_both_directions(small_dataset):
    names = (small_dataset / "splits" / "train.txt").read_text().split()
    (small_dataset / "masks" / f"{names[0]}.jpg").unlink()
    (small_dataset / "images" / f"{names[1]}.jpg").unlink()
    splits, problems = load_local_splits(small_dataset)
    assert any(f"{names[0]}.jpg: no mask" in problem for problem in problems)
    assert any(f"{names[1]}.jpg: no image" in problem for problem in problems)
    assert len(splits["train"]) == 10
