"""The shipped checkpoint: its card's figures are reproduced by evaluate_model.py, and `make demo` segments the examples."""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from polyp_segmentation.testing import REPO_ROOT

WEIGHTS = REPO_ROOT / "model.safetensors"
README = REPO_ROOT / "README.md"


@pytest.fixture(scope="module")
def shipped_weights():
    if not WEIGHTS.is_file():
        pytest.skip(f"no trained checkpoint shipped yet at {WEIGHTS}")
    return WEIGHTS


def evaluate_like(recorded_name: str, kvasir_root, output_json) -> dict:
    """Runs evaluate_model.py on the shipped weights with the settings of the card's `eval/<recorded_name>`."""
    recorded = json.loads((REPO_ROOT / "eval" / recorded_name).read_text())
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate_model.py"), "--model", str(REPO_ROOT), "--dataset_name", str(kvasir_root),
         "--split", recorded["split"], "--resolution", str(recorded["resolution"]), "--output_json", str(output_json),
         *(["--tta"] if recorded["tta"] else [])],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output_json.read_text())


@pytest.fixture(scope="module")
def fresh_test_evaluation(shipped_weights, kvasir_root, tmp_path_factory) -> dict:
    return evaluate_like("test.json", kvasir_root, tmp_path_factory.mktemp("eval") / "test.json")


def test_medium_matmul_precision_scores_the_shipped_weights_as_the_default_does(shipped_weights, kvasir_root,
                                                                              tmp_path):
    """On CPUs without AMX, `--float32_matmul_precision medium` only moves the products from MKL to oneDNN."""
    results = {}
    for precision in ("highest", "medium"):
        output_json = tmp_path / f"{precision}.json"
        completed = subprocess.run(
            [sys.executable, str(REPO_ROOT / "evaluate_model.py"), "--model", str(REPO_ROOT), "--dataset_name",
             str(kvasir_root), "--split", "validation", "--max_eval_samples", "8", "--float32_matmul_precision",
             precision, "--output_json", str(output_json)], capture_output=True, text=True, cwd=REPO_ROOT)
        assert completed.returncode == 0, completed.stderr[-3000:]
        results[precision] = json.loads(output_json.read_text())
        assert results[precision]["float32_matmul_precision"] == precision
    for default, medium in zip(results["highest"]["per_image"], results["medium"]["per_image"]):
        assert medium["dice"] == pytest.approx(default["dice"], abs=0.01), default["name"]
    assert results["medium"]["loss"] == pytest.approx(results["highest"]["loss"], rel=1e-3)


def card_model_index(name: str) -> float:
    from huggingface_hub import ModelCard

    results = ModelCard.load(README).data.eval_results
    (value,) = [result.metric_value for result in results if result.metric_type == name]
    return value


def test_shipped_checkpoint_does_not_regress_below_the_card(fresh_test_evaluation):
    assert fresh_test_evaluation["metrics"]["mean_dice"] >= card_model_index("mean_dice") - 0.005


def assert_recorded_evaluation_matches(recorded_name: str, fresh: dict, weights) -> None:
    """The card is written from eval/<recorded_name> (see the test below); the figures there must be evaluate_model.py's
    for the shipped weights now."""
    recorded = json.loads((REPO_ROOT / "eval" / recorded_name).read_text())
    assert recorded["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest(), (
        f"eval/{recorded_name} was measured on other weights: rerun evaluate_model.py and make_model_card.py"
    )
    assert recorded["split_sha256"] == fresh["split_sha256"]
    for name, value in fresh["metrics"].items():
        assert recorded["metrics"][name] == pytest.approx(value, abs=1e-4), name
    assert recorded["loss"] == pytest.approx(fresh["loss"], abs=1e-4)


def test_card_figures_are_evaluate_output_for_the_shipped_weights(fresh_test_evaluation, shipped_weights):
    assert_recorded_evaluation_matches("test.json", fresh_test_evaluation, shipped_weights)
    assert card_model_index("mean_dice") == pytest.approx(fresh_test_evaluation["metrics"]["mean_dice"], abs=1e-4)
    assert f"| dice | {fresh_test_evaluation['metrics']['mean_dice']:.4f} |" in README.read_text()


@pytest.mark.slow
def test_card_flip_tta_figures_are_evaluate_output(shipped_weights, kvasir_root, tmp_path):
    if not (REPO_ROOT / "eval" / "test_tta.json").is_file():
        pytest.skip("the card has no flip-TTA figures (eval/test_tta.json)")
    fresh = evaluate_like("test_tta.json", kvasir_root, tmp_path / "test_tta.json")
    assert fresh["tta"]
    assert_recorded_evaluation_matches("test_tta.json", fresh, shipped_weights)


def test_card_is_hub_sized_with_metadata_huggingface_hub_reads():
    from huggingface_hub import ModelCard

    text = README.read_text()
    assert len(text.splitlines()) <= 200
    card = ModelCard.load(README)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert {result.metric_type for result in card.data.eval_results} >= {"mean_dice", "mean_iou", "pooled_dice"}
    assert "/work/" not in text and "/home/" not in text  # no path of any machine
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (REPO_ROOT / link).is_file(), link


def test_demo_segments_an_example_image_with_the_shipped_checkpoint(shipped_weights, tmp_path):
    example = sorted((REPO_ROOT / "examples").glob("*.jpg"))[0]
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "predict.py"), str(example), "--model", str(REPO_ROOT),
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    mask = PIL.Image.open(tmp_path / f"{example.stem}_mask.png")
    assert mask.size == PIL.Image.open(example).size
    assert (tmp_path / f"{example.stem}_overlay.png").is_file()


def write_stage(training_dir, name: str, started: str) -> None:
    folder = training_dir / name
    folder.mkdir(parents=True)
    (folder / "invocations.jsonl").write_text(json.dumps({"started": started, "command": f"run {name}"}) + "\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "eval_mean_dice": 0.5}) + "\n")


def test_card_lists_training_stages_in_the_order_they_ran_not_by_folder_name(tmp_path):
    from make_model_card import load_stages

    write_stage(tmp_path, "stage10", "2026-11-26T13:00:00+0000")
    write_stage(tmp_path, "stage9", "2026-11-26T10:13:43+0000")
    write_stage(tmp_path, "stage2", "2026-11-26T01:01:37+0000")
    assert [stage["name"] for stage in load_stages(tmp_path)] == ["stage2", "stage9", "stage10"]


def test_card_refuses_a_stage_without_its_commands(tmp_path):
    from make_model_card import load_stages

    write_stage(tmp_path, "stage1", "2026-11-26T01:01:37+0000")
    (tmp_path / "stage1" / "invocations.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"stage1/invocations\.jsonl is empty"):
        load_stages(tmp_path)


def test_card_names_the_shipped_epoch_from_the_best_models_results_or_else_the_last(tmp_path):
    from make_model_card import load_stages, schedule_state

    write_stage(tmp_path, "stage11", "2026-12-07T07:05:00+0000")
    folder = tmp_path / "stage11"
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "eval_mean_dice": 0.5}) + "\n"
                                                  for e in (1, 2, 3)))
    with open(folder / "invocations.jsonl", "w") as f:
        f.write(json.dumps({"started": "2026-12-07T07:05:00+0000", "command": "run", "num_train_epochs": 3}) + "\n")
    [stage] = load_stages(tmp_path)
    assert stage["shipped_epoch"] == 3
    assert schedule_state(stage) == "That run went through its whole schedule (3 epochs)."
    (folder / "eval_results.json").write_text(json.dumps({"epoch": 2, "eval": {"mean_dice": 0.5}}))
    [stage] = load_stages(tmp_path)
    assert stage["shipped_epoch"] == 2
    assert "the shipped weights are its epoch 2" in schedule_state(stage)


def test_lineage_keeps_the_rows_of_stages_whose_logs_left_the_tree_and_writes_the_others():
    from make_model_card import render_lineage

    stage = {"name": "stage11", "invocations": [{
        "started": "2026-12-06T01:23:59+0000", "init_from": ".", "resolution": 256, "train_crop_size": 160,
        "negative_ratio": 0.5, "learning_rate": 2e-4, "total_batch_size": 16}],
        "epochs": [{"epoch": e, "eval_mean_dice": d, "eval_loss": 0.2, "data_seconds": 900, "model_seconds": 2700,
                    "eval_seconds": 0} for e, d in ((1, 0.78), (2, 0.80))]}
    table = ("| stage | started | epochs | resolution | recipe | hours (CPU) | best validation mDice |\n"
             "|---|---|---:|---:|---|---:|---:|\n"
             "| stage9 | 2026-11-26 | 12 | 256 | kept as written | 1.02 | 0.7055 (epoch 6) |\n"
             "| stage11 | 2026-12-06 | 1 | 256 | an older row | 1.00 | 0.7800 (epoch 1) |")
    assert render_lineage(table, [stage]).splitlines()[2:] == [
        "| stage9 | 2026-11-26 | 12 | 256 | kept as written | 1.02 | 0.7055 (epoch 6) |",
        ("| stage11 | 2026-12-06 | 2 | 256 | from the previous stage's weights; 160px crops; 50% polyp-free items; "
         "lr 0.0002, batch 16 | 2.00 | 0.8000 (epoch 2) |")]


def test_lineage_names_the_earlier_stage_a_run_started_from():
    """A stage that starts from an older stage's weights (a folder of that commit's files named after it), not from
    the weights at the root, says which."""
    from make_model_card import stage_start

    assert stage_start({"init_from": "."}) == "from the previous stage's weights"
    assert stage_start({"init_from": "/work/stage10"}) == "from stage10's weights"
    assert stage_start({"init_from": "runs/other"}) == "from the weights in `runs/other`"
    assert stage_start({"init_from": ".", "init_encoder_from": "."}) == "with a new decoder on the previous stage's encoder"
    assert stage_start({"init_from": None}) == "from scratch"


def test_card_leaves_out_epochs_whose_validation_was_not_finite():
    """Non-finite weights score Dice 0 with a NaN loss: such epochs are gaps in the curve, not its best or worst."""
    from make_model_card import best_epoch, curve_shape, validation_dice

    dice_and_loss = [(0.70, 0.30), (0.71, 0.29), (0.0, float("nan")), (0.0, float("nan")), (0.72, 0.28), (0.715, 0.28)]
    stage = {"epochs": [{"epoch": i + 1, "eval_mean_dice": dice, "eval_loss": loss}
                        for i, (dice, loss) in enumerate(dice_and_loss)]}
    assert [np.isnan(validation_dice(e)) for e in stage["epochs"]] == [False, False, True, True, False, False]
    assert best_epoch(stage)["epoch"] == 5
    assert curve_shape(stage) == "still rising (best 0.7200 in the last two epochs)"
    stage["epochs"].append({"epoch": 7, "eval_mean_dice": 0.71, "eval_loss": 0.29})
    assert curve_shape(stage) == "flattening (best 0.7200 at epoch 5 of 7; last epochs 0.720, 0.715, 0.710)"


DOCS = ("training.md", "architecture.md", "performance.md", "lineage.md")


def run_make_model_card(kvasir_root, nopolyp_root, tmp_path, *extra: str) -> None:
    from make_model_card import main

    shutil.copyfile(README, tmp_path / "README.md")
    shutil.copytree(REPO_ROOT / "docs", tmp_path / "docs")
    main(["--readme", str(tmp_path / "README.md"), "--docs_dir", str(tmp_path / "docs"), "--assets_dir",
          str(tmp_path / "assets"), "--dataset_name", str(kvasir_root), "--negative_dataset_name", str(nopolyp_root),
          *extra])


def test_card_and_docs_are_what_make_model_card_writes_from_the_committed_measurements(shipped_weights, kvasir_root,
                                                                                        nopolyp_root, tmp_path):
    """The card (from docs/model_card_template.md), the generated parts of docs/ and the figures come from
    make_model_card.py: run on the committed files, it leaves them as committed."""
    run_make_model_card(kvasir_root, nopolyp_root, tmp_path)
    assert (tmp_path / "README.md").read_text() == README.read_text(), "README.md differs: run make_model_card.py"
    for name in DOCS:
        assert (tmp_path / "docs" / name).read_text() == (REPO_ROOT / "docs" / name).read_text(), (
            f"docs/{name} differs from what make_model_card.py writes: run it")
    for name in ("training_curves.png", "test_predictions.png", "polyp_free_predictions.png"):
        with PIL.Image.open(tmp_path / "assets" / name) as drawn, PIL.Image.open(REPO_ROOT / "assets" / name) as kept:
            assert drawn.size == kept.size


@pytest.mark.parametrize("file, split", [("test.json", "test"), ("validation.json", "validation")])
def test_card_figures_refuse_an_evaluation_of_other_data(file, split, shipped_weights, kvasir_root, nopolyp_root,
                                                         tmp_path):
    eval_dir = tmp_path / "eval"
    shutil.copytree(REPO_ROOT / "eval", eval_dir)
    result = json.loads((eval_dir / file).read_text())
    if split == "test":
        result["per_image"][0].update(name="not-a-frame-of-the-split", dice=0.0)  # the worst frame: always drawn
    else:  # the quietest polyp-free frame: always drawn
        result["negatives"]["negatives"]["per_image"][0].update(name="not-a-frame-of-the-split", marked_fraction=-1.0)
    (eval_dir / file).write_text(json.dumps(result))
    with pytest.raises(ValueError, match=f"not-a-frame-of-the-split.*not in its {split} split"):
        run_make_model_card(kvasir_root, nopolyp_root, tmp_path, "--eval_dir", str(eval_dir))
    assert (tmp_path / "README.md").read_text() == README.read_text()


def generated_block(document: str, name: str) -> str:
    text = (REPO_ROOT / "docs" / document).read_text()
    return text.split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def test_training_speed_table_is_the_committed_benchmark():
    from polyp_segmentation.reports import render_training_speed

    result = json.loads((REPO_ROOT / "benchmarks" / "train_cpu.json").read_text())
    block = generated_block("training.md", "training-speed")
    assert block.strip() == render_training_speed(result).strip()
    for step in result["step_alone"]:
        assert f"| {step['variant']} | {step['frames_per_second']:.2f} |" in block


def test_performance_table_is_the_committed_benchmark():
    from polyp_segmentation.reports import render_performance

    report = json.loads((REPO_ROOT / "benchmarks" / "cpu.json").read_text())
    assert generated_block("performance.md", "performance").strip() == render_performance(report).strip()


def test_fit_probe_table_is_the_committed_probe_results():
    """Every row of the fit-probe table comes from benchmarks/fit_probe.jsonl, in its order."""
    from make_model_card import load_jsonl
    from polyp_segmentation.reports import render_fit_probe

    results = load_jsonl(REPO_ROOT / "benchmarks" / "fit_probe.jsonl")
    block = generated_block("architecture.md", "fit-probe")
    assert block.strip() == render_fit_probe(results).strip()
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| probe")]
    assert len(rows) == len(results)
    for row, result in zip(rows, results):
        assert result["label"] in row and f"{result['fit_mean_dice']:.3f}" in row


def test_recipe_says_what_the_polyp_free_items_were_cut_from_where_the_run_logged_it():
    from make_model_card import polyp_free_items

    assert polyp_free_items({"negative_ratio": 0.5}) == "50% polyp-free items"
    assert polyp_free_items({"negative_ratio": 0.5, "own_negative_share": 0.5, "near_polyp_share": 0.0}) == (
        "50% polyp-free items (50% of them crops of the training frames)")
    assert polyp_free_items({"negative_ratio": 0.5, "own_negative_share": 0.8, "near_polyp_share": 1.0}) == (
        "50% polyp-free items (80% of them crops of the training frames, 100% of those just past the polyp)")
