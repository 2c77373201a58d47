"""Training and evaluation: the split rule, augmentation, metrics, the loss going down, resume and multi-process runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyp_segmentation.data import (
    PolypSegmentationDataset,
    decode_samples,
    load_local_splits,
)
from polyp_segmentation.testing import (
    REPO_ROOT,
    TINY_CONFIG_OVERRIDES,
    TINY_OVERRIDES,
    assert_same_weights,
    final_weights,
    make_model,
    run_training,
    save_as_normalised_input_folder,
)

# The root config's stochastic depth stays on elsewhere (resumes must reproduce its draws); a compiled forward draws
# from Inductor's own random sequence, not eager's, so runs compared with one go without it.
WITHOUT_STOCHASTIC_DEPTH = ("--config_overrides", TINY_CONFIG_OVERRIDES + ",drop_path_rate=0.0")














def test_a_recipe_file_sets_the_flags_and_the_command_line_overrides_it(tmp_path):
    import train_accelerate

    args = train_accelerate.parse_args(["--config", str(REPO_ROOT / "recipes" / "cpu_stage10.yaml"),
                                        "--output_dir", str(tmp_path), "--seed", "3"])
    assert args.train_scale_jitter == [0.75, 1.33] and args.channels_last and args.model_ema_decay == 0.999
    assert args.num_train_epochs == 250 and args.seed == 3


@pytest.mark.parametrize("recipe", sorted(path.name for path in (REPO_ROOT / "recipes").glob("*.yaml")))
def test_every_committed_recipe_parses(recipe, tmp_path):
    import train_accelerate

    train_accelerate.parse_args(["--config", str(REPO_ROOT / "recipes" / recipe), "--output_dir", str(tmp_path)])


def test_a_recipe_with_an_unknown_flag_is_refused_by_name(tmp_path, capsys):
    import train_accelerate

    (tmp_path / "recipe.yaml").write_text("learning_rate: 1.0e-3\nlearning_rat: 2\n")
    with pytest.raises(SystemExit):
        train_accelerate.parse_args(["--config", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path)])
    assert "learning_rat are not flags of this script" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train_scale_jitter", "0", "1.2"], "--train_scale_jitter must be two zoom factors"),
        (["--train_scale_jitter", "1.2", "0.8"], "--train_scale_jitter must be two zoom factors"),
        (["--train_scale", "0.5", "1", "--train_scale_jitter", "0.8", "1.2"], "pick one"),
        (["--final_full_frame_epochs", "2"], "--final_full_frame_epochs only changes a run that trains on"),
        (["--final_full_frame_epochs", "-1", "--train_crop_size", "64"], "--final_full_frame_epochs must be >= 0"),
        (["--train_eval_samples", "-5"], "--train_eval_samples must be >= 0"),
        (["--start_epoch", "2", "--resume_from_checkpoint", "latest"], "cannot be combined with --resume_from"),
        (["--snapshot_dir", "{output_dir}"], "--snapshot_dir must be another folder than --output_dir"),
    ],
)
def test_bad_recipe_flags_are_refused_by_name(flags, message, tmp_path, capsys):
    import train_accelerate

    with pytest.raises(SystemExit):
        train_accelerate.parse_args(["--output_dir", str(tmp_path), *(f.format(output_dir=tmp_path) for f in flags)])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("scale", [["0", "1"], ["0.8", "0.5"], ["0.5", "1.5"]])
def test_train_scale_outside_the_unit_interval_is_refused(scale, tmp_path, capsys):
    import train_accelerate

    with pytest.raises(SystemExit):
        train_accelerate.parse_args(["--output_dir", str(tmp_path), "--train_scale", *scale])
    assert "--train_scale" in capsys.readouterr().err


@pytest.mark.parametrize("decay", ["0", "1", "1.5"])
def test_model_ema_decay_outside_the_unit_interval_is_refused(decay, tmp_path, capsys):
    import train_accelerate

    with pytest.raises(SystemExit):
        train_accelerate.parse_args(["--output_dir", str(tmp_path), "--model_ema_decay", decay])
    assert "--model_ema_decay must lie in (0, 1)" in capsys.readouterr().err














def test_loss_decreases_on_a_fixed_batch(kvasir_root):
    splits, _ = load_local_splits(kvasir_root)
    names, images, masks, problems = decode_samples(splits["train"][:4], resolution=64)
    assert not problems
    dataset = PolypSegmentationDataset(names, images, masks)  # values in [0, 1]: the model normalises them
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    model = make_model(**TINY_OVERRIDES).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.fixture(scope="module")
def uninterrupted_run(kvasir_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    completed = run_training(output_dir, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "epoch")
    return output_dir, completed


@pytest.fixture(scope="module")
def run_with_normalised_input(kvasir_root, tmp_path_factory) -> Path:
    """The uninterrupted run's recipe with the config and processor of a folder saved before the model normalised its
    inputs: the data pipeline normalises instead."""
    config_dir = save_as_normalised_input_folder(REPO_ROOT, tmp_path_factory.mktemp("normalised_input_config"))
    output_dir = tmp_path_factory.mktemp("normalised_input_run")
    run_training(output_dir, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
                 "--config_name", str(config_dir))
    return output_dir


def test_normalising_in_the_model_or_in_the_data_trains_the_same_weights(run_with_normalised_input,
                                                                          uninterrupted_run):
    assert json.loads((run_with_normalised_input / "config.json").read_text())["image_mean"] is None
    assert json.loads((run_with_normalised_input / "preprocessor_config.json").read_text())["do_normalize"]
    assert_same_weights(final_weights(run_with_normalised_input), final_weights(uninterrupted_run[0]))


def test_a_checkpoint_of_a_normalised_input_run_resumes_exactly_under_the_new_config(run_with_normalised_input,
                                                                                       kvasir_root, tmp_path):
    """A run started before the change and resumed after it, with the repository's config (which normalises in the
    model), ends where it would have."""
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
                 "--resume_from_checkpoint", str(run_with_normalised_input / "checkpoints" / "checkpoint-4"))
    assert json.loads((tmp_path / "config.json").read_text())["image_mean"] == [0.485, 0.456, 0.406]
    assert_same_weights(final_weights(tmp_path), final_weights(run_with_normalised_input))


@pytest.fixture(scope="module")
def uninterrupted_run_with_step_checkpoints(kvasir_root, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted_steps")
    run_training(output_dir, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "3")
    return output_dir


def test_training_run_writes_a_loadable_hub_folder_and_logs(uninterrupted_run):
    output_dir, completed = uninterrupted_run
    names = {p.name for p in output_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_attention_unet.py",
            "configuration_attention_unet.py", "image_processing_attention_unet.py", "README.md"} <= names
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "eval_mean_dice", "eval_mean_iou", "eval_mean_f1", "eval_mean_precision",
                "eval_mean_recall", "eval_mean_accuracy", "eval_loss", "eval_pooled_dice", "train_images_per_second",
                "train_eval_mean_dice", "train_eval_loss"):
        assert key in records[0]
    # The training subset is scored without augmentation: the same weights would give the same figure twice.
    assert 0 <= records[0]["train_eval_mean_dice"] <= 1 and records[0]["train_eval_mean_dice"] != records[0]["eval_mean_dice"]
    # fp16 is the default recipe; without a GPU it must say it falls back.
    assert "fp16 needs a GPU; training in fp32" in completed.stderr
    from transformers import AutoModel

    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True)
    assert model.config.encoder_name == "convnext_atto"


def test_resume_after_epoch_one_ends_with_the_same_weights(uninterrupted_run, kvasir_root, tmp_path):
    output_dir, _ = uninterrupted_run
    after_epoch_one = output_dir / "checkpoints" / "checkpoint-4"
    assert json.loads((after_epoch_one / "training_state.json").read_text())["epoch"] == 1
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
                 "--resume_from_checkpoint", str(after_epoch_one))
    assert_same_weights(final_weights(tmp_path), final_weights(output_dir))


def test_checkpointing_frequency_does_not_change_training(uninterrupted_run, uninterrupted_run_with_step_checkpoints):
    assert_same_weights(final_weights(uninterrupted_run_with_step_checkpoints), final_weights(uninterrupted_run[0]))


def test_resume_mid_epoch_ends_with_the_same_weights(uninterrupted_run_with_step_checkpoints, kvasir_root, tmp_path):
    output_dir = uninterrupted_run_with_step_checkpoints
    mid_epoch = output_dir / "checkpoints" / "checkpoint-6"
    state = json.loads((mid_epoch / "training_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "3",
                 "--resume_from_checkpoint", str(mid_epoch))
    assert_same_weights(final_weights(tmp_path), final_weights(output_dir))


@pytest.fixture(scope="module")
def model_ema_run(kvasir_root, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("model_ema")
    run_training(output_dir, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
                 "--model_ema_decay", "0.9", "--snapshot_dir", str(output_dir / "snapshot"))
    return output_dir


def test_model_ema_leaves_the_raw_training_unchanged(model_ema_run, uninterrupted_run):
    assert_same_weights(final_weights(model_ema_run), final_weights(uninterrupted_run[0]))


def test_model_ema_is_the_model_validated_and_saved(model_ema_run):
    best_epoch = json.loads((model_ema_run / "eval_results.json").read_text())["epoch"]
    best_checkpoint = model_ema_run / "checkpoints" / f"checkpoint-{4 * best_epoch}"
    average = load_file(best_checkpoint / "model_ema.safetensors")
    raw = load_file(best_checkpoint / "model.safetensors")
    assert not all(torch.equal(average[name], raw[name]) for name in raw)
    assert_same_weights(load_file(model_ema_run / "model.safetensors"), average)
    assert json.loads((model_ema_run / "invocations.jsonl").read_text())["model_ema_decay"] == 0.9


def test_resume_restores_the_model_ema(model_ema_run, kvasir_root, tmp_path):
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "epoch",
                 "--model_ema_decay", "0.9", "--resume_from_checkpoint",
                 str(model_ema_run / "checkpoints" / "checkpoint-4"))
    resumed, uninterrupted = (load_file(run / "checkpoints" / "checkpoint-8" / "model_ema.safetensors")
                              for run in (tmp_path, model_ema_run))
    assert_same_weights(resumed, uninterrupted)


def test_resuming_a_run_without_model_ema_into_one_with_it_is_refused(uninterrupted_run, kvasir_root, tmp_path):
    checkpoint = uninterrupted_run[0] / "checkpoints" / "checkpoint-4"
    with pytest.raises(AssertionError, match="has no model_ema.safetensors"):
        run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--model_ema_decay", "0.9",
                     "--resume_from_checkpoint", str(checkpoint))


def test_snapshot_holds_the_validated_weights_in_fp16_and_the_runs_place(model_ema_run):
    snapshot = model_ema_run / "snapshot"
    average = load_file(model_ema_run / "checkpoints" / "checkpoint-8" / "model_ema.safetensors")
    saved = load_file(snapshot / "model.safetensors")
    assert saved.keys() == average.keys()
    for name, tensor in average.items():
        assert torch.equal(saved[name], tensor.half() if tensor.is_floating_point() else tensor), name
    state = json.loads((snapshot / "training_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["completed_steps"]) == (2, 0, 8)
    for log in ("metrics.jsonl", "invocations.jsonl"):
        assert (snapshot / log).read_text() == (model_ema_run / log).read_text()
    assert not list(snapshot.glob(".*partial"))


def test_latest_continues_from_the_snapshot_where_the_checkpoints_are_gone(model_ema_run, kvasir_root, tmp_path):
    """A new machine: the committed snapshot, no checkpoints. The run goes on at the snapshot's epoch with fp32
    weights, one schedule over the whole run, and the whole run's logs."""
    from transformers import get_scheduler

    snapshot = shutil.copytree(model_ema_run / "snapshot", tmp_path / "snapshot")
    completed = run_training(tmp_path / "run", kvasir_root, "--num_train_epochs", "4", "--model_ema_decay", "0.9",
                             "--resume_from_checkpoint", "latest", "--snapshot_dir", str(snapshot))
    assert f"continuing from the snapshot in {snapshot} at epoch 2 (step 8)" in completed.stderr
    assert "of epochs 3-4 (this run went on from saved weights at epoch 2; metrics.jsonl has every epoch)" in \
        completed.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 4), (2, 8), (3, 12), (4, 16)]
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=round(0.05 * 16), num_training_steps=16)
    for _ in range(12):
        optimizer.step()
        schedule.step()
    assert records[2]["learning_rate"] == pytest.approx(schedule.get_last_lr()[0], rel=1e-9)
    assert all(t.dtype == torch.float32 for t in final_weights(tmp_path / "run").values() if t.is_floating_point())
    assert json.loads((snapshot / "training_state.json").read_text())["epoch"] == 4
    assert (snapshot / "metrics.jsonl").read_text() == (tmp_path / "run" / "metrics.jsonl").read_text()
    assert len((snapshot / "invocations.jsonl").read_text().splitlines()) == 2


def test_optimizer_is_fused_adamw_without_decay_on_biases_and_norms():
    from polyp_segmentation.training import build_optimizer

    model = make_model(**TINY_OVERRIDES)
    optimizer = build_optimizer(model, 1e-3, 0.05, "cpu")
    decay, no_decay = optimizer.param_groups
    assert optimizer.defaults["fused"] and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.ndim <= 1}
    assert not build_optimizer(model, 1e-3, 0.05, "mps").defaults["fused"]


def test_shipped_weights_hold_finite_batch_norm_statistics():
    """Snapshots keep tensors beyond fp16's range in fp32 (below), so no saved model needs its statistics repaired."""
    weights = load_file(REPO_ROOT / "model.safetensors")
    statistics = {name: tensor for name, tensor in weights.items() if name.endswith(("running_mean", "running_var"))}
    assert statistics and all(torch.isfinite(tensor).all() for tensor in statistics.values())


def test_snapshot_keeps_tensors_beyond_fp16_range_in_fp32(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoImageProcessor

    from polyp_segmentation.checkpoints import save_model_folder

    model = make_model(**TINY_OVERRIDES)
    model.decoder.blocks[0].conv1.norm.running_var[0] = 1e6
    processor = AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    save_model_folder(Accelerator(cpu=True), model, processor, tmp_path, "snapshot", {},
                                       dtype=torch.float16)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved["decoder.blocks.0.conv1.norm.running_var"].dtype == torch.float32
    assert saved["decoder.blocks.0.conv1.norm.running_var"][0] == 1e6
    assert saved["decoder.blocks.0.conv1.norm.running_mean"].dtype == torch.float16
    assert saved["decoder.blocks.0.conv1.conv.weight"].dtype == torch.float16


def test_released_weights_are_stored_in_fp16_but_for_tensors_beyond_its_range(tmp_path):
    from safetensors.torch import save_file

    from polyp_segmentation.checkpoints import store_weights_in_float16

    model = make_model(**TINY_OVERRIDES)
    model.decoder.blocks[0].conv1.norm.running_var[0] = 1e6
    source = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(source, tmp_path / "best.safetensors")
    store_weights_in_float16(tmp_path / "best.safetensors", tmp_path / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == source.keys()
    assert saved["decoder.blocks.0.conv1.norm.running_var"].dtype == torch.float32
    assert saved["decoder.blocks.0.conv1.norm.running_var"][0] == 1e6
    assert torch.equal(saved["decoder.blocks.0.conv1.conv.weight"], source["decoder.blocks.0.conv1.conv.weight"].half())
    assert saved["decoder.blocks.0.conv1.norm.num_batches_tracked"].dtype == torch.int64


def test_continuing_from_the_snapshot_of_an_ended_run_says_so(model_ema_run, kvasir_root, tmp_path):
    with pytest.raises(AssertionError, match="Epoch 2 to start from .* the run has ended"):
        run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--resume_from_checkpoint", "latest",
                     "--snapshot_dir", str(model_ema_run / "snapshot"))


def test_two_processes_end_with_identical_weights(kvasir_root, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    completed = run_training(tmp_path, kvasir_root, "--num_train_epochs", "1", "--mixed_precision", "no",
                             launcher=launcher, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert "Weights identical on all 2 process(es)" in completed.stderr
    assert "2 process(es) on cpu" in completed.stderr


def test_scale_augmented_run_logs_its_recipe_to_tensorboard(kvasir_root, tmp_path):
    """The run config (with the list-valued scale range) must go through TensorBoard's hparams and into the logs."""
    run_training(tmp_path, kvasir_root, "--max_train_steps", "1", "--train_scale", "0.5", "1.0",
                 "--report_to", "tensorboard")
    invocation = json.loads((tmp_path / "invocations.jsonl").read_text().splitlines()[-1])
    assert invocation["train_scale"] == [0.5, 1.0]
    assert "--train_scale 0.5 1.0" in invocation["command"]
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_crops_with_zoom_jitter_then_full_frames_for_the_last_epochs(kvasir_root, tmp_path):
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "3", "--train_crop_size", "48",
                 "--train_scale_jitter", "0.75", "1.33", "--final_full_frame_epochs", "1")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_image_size"] for r in records] == [48, 48, 64]
    # One schedule over the three epochs: the learning rate decays across the switch to whole frames.
    assert records[0]["learning_rate"] > records[1]["learning_rate"] > records[2]["learning_rate"]
    invocation = json.loads((tmp_path / "invocations.jsonl").read_text())
    assert invocation["train_scale_jitter"] == [0.75, 1.33] and invocation["final_full_frame_epochs"] == 1


@pytest.fixture(scope="module")
def fast_path_run(kvasir_root, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("fast_path")
    run_training(output_dir, kvasir_root, "--num_train_epochs", "2", *WITHOUT_STOCHASTIC_DEPTH, "--channels_last",
                 "--torch_compile", "--float32_matmul_precision", "medium")
    return output_dir


@pytest.fixture(scope="module")
def eager_run_without_stochastic_depth(kvasir_root, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("eager_without_stochastic_depth")
    run_training(output_dir, kvasir_root, "--num_train_epochs", "2", *WITHOUT_STOCHASTIC_DEPTH)
    return output_dir


def test_augmenting_on_the_device_trains_and_resumes_like_the_workers(uninterrupted_run_with_step_checkpoints,
                                                                        kvasir_root, tmp_path):
    run_training(tmp_path / "full", kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "3",
                 "--augment_on_device")
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(uninterrupted_run_with_step_checkpoints))
    run_training(tmp_path / "resumed", kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "3",
                 "--augment_on_device", "--resume_from_checkpoint",
                 str(tmp_path / "full" / "checkpoints" / "checkpoint-6"))
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "full"))


def test_channels_last_compile_and_medium_matmul_precision_train_like_eager(fast_path_run,
                                                                           eager_run_without_stochastic_depth):
    eager, fast = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                   for run in (eager_run_without_stochastic_depth, fast_path_run))
    for plain, other in zip(eager, fast):
        assert other["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3, abs=1e-4)
        assert other["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-3, abs=1e-4)
    invocation = json.loads((fast_path_run / "invocations.jsonl").read_text())
    assert invocation["channels_last"] and invocation["torch_compile"]
    assert invocation["float32_matmul_precision"] == "medium"


def test_channels_last_compile_and_medium_matmul_precision_resume_exactly(fast_path_run, kvasir_root, tmp_path):
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", *WITHOUT_STOCHASTIC_DEPTH, "--channels_last",
                 "--torch_compile", "--float32_matmul_precision", "medium",
                 "--resume_from_checkpoint", str(fast_path_run / "checkpoints" / "checkpoint-4"))
    assert_same_weights(final_weights(tmp_path), final_weights(fast_path_run))


def test_start_epoch_continues_saved_weights_at_the_same_point_of_the_schedule(uninterrupted_run, kvasir_root,
                                                                               tmp_path):
    """A run whose checkpoints are lost goes on from its saved weights where the schedule stood."""
    output_dir, _ = uninterrupted_run
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--init_from", str(output_dir),
                 "--start_epoch", "1")
    continued = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in continued] == [(2, 8)]
    assert continued[0]["learning_rate"] == pytest.approx(uninterrupted[1]["learning_rate"], rel=1e-9)


def test_init_encoder_from_loads_only_the_encoder_and_names_a_misfit(tiny_model_dir):
    import train_accelerate

    weights = tiny_model_dir / "model.safetensors"
    saved = load_file(weights)
    model = make_model(seed=5, **TINY_OVERRIDES, decoder_upsampling="nearest")
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    train_accelerate.load_encoder_weights(model, weights)
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, saved[f"encoder.{name}"]), name
    assert_same_weights(model.decoder.state_dict(), decoder_before)
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit this config's encoder 'resnet18'"):
        train_accelerate.load_encoder_weights(make_model(encoder_name="resnet18", decoder_channels=[8] * 5), weights)


def test_default_convnext_tiny_trains_one_step(kvasir_root, tmp_path):
    command = [
        sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--dataset_name", str(kvasir_root),
        "--output_dir", str(tmp_path), "--resolution", "64", "--max_train_samples", "4", "--max_eval_samples", "2",
        "--per_device_train_batch_size", "2", "--max_train_steps", "1", "--report_to", "none",
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert json.loads((tmp_path / "config.json").read_text())["encoder_name"] == "convnext_tiny"


def test_evaluate_reports_both_aggregations_and_provenance(uninterrupted_run, kvasir_root, tmp_path):
    output_dir, _ = uninterrupted_run
    output_json = tmp_path / "eval.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate_model.py"), "--model", str(output_dir), "--dataset_name", str(kvasir_root),
         "--split", "test", "--resolution", "64", "--max_eval_samples", "6", "--tta", "--output_json", str(output_json)],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "| metric | mean over images | pooled over pixels |" in completed.stdout
    result = json.loads(output_json.read_text())
    assert result["num_images"] == 6 and result["tta"] and len(result["per_image"]) == 6
    assert len(result["weights_sha256"]) == 64 and len(result["split_sha256"]) == 64
    mean_dice = sum(image["dice"] for image in result["per_image"]) / 6
    assert result["metrics"]["mean_dice"] == pytest.approx(mean_dice)


def test_init_from_starts_from_the_saved_weights_and_architecture(uninterrupted_run, kvasir_root, tmp_path):
    output_dir, _ = uninterrupted_run
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--dataset_name", str(kvasir_root),
         "--output_dir", str(tmp_path), "--init_from", str(output_dir), "--resolution", "64",
         "--max_train_samples", "4", "--max_eval_samples", "2", "--per_device_train_batch_size", "2",
         "--max_train_steps", "1", "--learning_rate", "0", "--report_to", "none"],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    start = load_file(output_dir / "model.safetensors")
    after_one_step_at_lr_0 = final_weights(tmp_path)
    for name, tensor in start.items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BN statistics still move
            assert torch.equal(tensor, after_one_step_at_lr_0[name]), name


def test_encoder_pretrained_offline_is_a_clear_error(kvasir_root, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--dataset_name", str(kvasir_root),
         "--output_dir", str(tmp_path), "--config_overrides", TINY_CONFIG_OVERRIDES, "--encoder_pretrained",
         "--resolution", "64", "--max_train_samples", "4", "--report_to", "none"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode != 0
    assert "--encoder_pretrained: could not load ImageNet weights for 'convnext_atto'" in completed.stderr
