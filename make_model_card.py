#!/usr/bin/env python
"""Regenerates the measured parts of the model card (README.md) from the files that measured them.

    python evaluate.py --model . --dataset_name ../shared/data/kvasir-seg --split validation --output_json eval/validation.json
    python evaluate.py --model . --dataset_name ../shared/data/kvasir-seg --split test --output_json eval/test.json
    python evaluate.py --model . --dataset_name ../shared/data/kvasir-seg --split test --tta --output_json eval/test_tta.json
    python make_model_card.py --dataset_name ../shared/data/kvasir-seg

Reads `eval/*.json` (written by evaluate.py for the weights at the root; `test_tta.json` is optional) and
`training/<stage>/` (each training stage's `metrics.jsonl` and `invocations.jsonl`, copied from its --output_dir), and
rewrites: the `model-index` in the card's metadata, the status, results and CPU-recipe sections,
`assets/training_curves.png` and `assets/test_predictions.png`; and, from `benchmarks/fit_probe.jsonl` and
`benchmarks/train_cpu.json`, the fit-probe and training-speed tables. Nothing in those parts is typed by hand.
"""

import argparse
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from segmentation_data import decode_sample, load_local_splits  # noqa: E402
from segmentation_inference import load_model_and_processor, overlay_mask  # noqa: E402
from segmentation_metrics import METRIC_NAMES, format_table  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent
TARGET_MEAN_DICE = 0.85


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    parser.add_argument("--eval_dir", default=str(REPO_ROOT / "eval"))
    parser.add_argument("--training_dir", default=str(REPO_ROOT / "training"))
    parser.add_argument("--assets_dir", default=str(REPO_ROOT / "assets"))
    parser.add_argument("--dataset_name", default=None,
                        help="Local Kvasir-SEG folder for the prediction figure (skipped without it).")
    parser.add_argument("--num_examples", type=int, default=5,
                        help="Test frames in the prediction figure, from the worst Dice to the best.")
    parser.add_argument("--fit_probe_results", default=str(REPO_ROOT / "benchmarks" / "fit_probe.jsonl"),
                        help="Results of benchmarks/fit_probe.py --output_jsonl, for the card's fit-probe table.")
    parser.add_argument("--training_speed_results", default=str(REPO_ROOT / "benchmarks" / "train_cpu.json"),
                        help="Results of benchmarks/bench_train.py --output_json, for the card's training-speed table.")
    return parser.parse_args(argv)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_stages(training_dir: Path) -> list[dict]:
    """The training stages in the order they ran (by their first invocation's start time, not by folder name:
    `stage10` sorts before `stage2`)."""
    stages = []
    for folder in (p for p in training_dir.iterdir() if p.is_dir()):
        invocations = load_jsonl(folder / "invocations.jsonl")
        if not invocations:
            raise ValueError(f"{folder / 'invocations.jsonl'} is empty: copy it from the stage's --output_dir.")
        stages.append({"name": folder.name, "epochs": load_jsonl(folder / "metrics.jsonl"), "invocations": invocations})
    return sorted(stages, key=stage_started)


def stage_started(stage: dict) -> datetime:
    return datetime.strptime(stage["invocations"][0]["started"], "%Y-%m-%dT%H:%M:%S%z")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_block(text: str, name: str, content: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"The card has no {start} ... {end} block.")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{content.strip()}\n{end}{after}"


def model_index(test: dict) -> str:
    metrics = test["metrics"]
    lines = [
        "model-index:",
        "- name: attention-unet-convnext-tiny-kvasir-seg",
        "  results:",
        "  - task:",
        "      type: image-segmentation",
        "      name: Polyp segmentation",
        "    dataset:",
        "      type: kowndinya23/Kvasir-SEG",
        "      name: Kvasir-SEG (fixed 60-image test half of the official validation split)",
        "      split: test",
        "    metrics:",
    ]
    for name in METRIC_NAMES:
        if name == "f1":
            continue
        lines += [f"    - type: mean_{name}", f"      value: {metrics[f'mean_{name}']:.4f}",
                  f"      name: mean {name} over images ({test['resolution']}x{test['resolution']})"]
    lines += ["    - type: pooled_dice", f"      value: {metrics['pooled_dice']:.4f}",
              "      name: Dice pooled over all pixels"]
    return "\n".join(lines)


def replace_model_index(text: str, test: dict) -> str:
    front, body = text.split("\n---\n", 1)
    front = re.sub(r"\nmodel-index:\n(?:[ -].*\n?)*", "\n", front + "\n").rstrip("\n")
    return f"{front}\n{model_index(test)}\n---\n{body}"


def stage_hours(stage: dict) -> float:
    return sum(e["data_seconds"] + e["model_seconds"] + e["eval_seconds"] for e in stage["epochs"]) / 3600


def training_summary(stages: list[dict]) -> tuple[int, float]:
    return sum(len(stage["epochs"]) for stage in stages), sum(stage_hours(stage) for stage in stages)


def validation_dice(epoch: dict, prefix: str = "eval") -> float:
    """The epoch's mean Dice, NaN where its loss was not finite: non-finite weights score 0 without being measured
    (epochs 60-64 of the v2 long run, validated with a BatchNorm variance stored as inf)."""
    return epoch[f"{prefix}_mean_dice"] if np.isfinite(epoch[f"{prefix}_loss"]) else float("nan")


def best_epoch(stage: dict) -> dict:
    return max((e for e in stage["epochs"] if np.isfinite(validation_dice(e))), key=validation_dice)


def curve_shape(stage: dict) -> str:
    # Only the last stage: earlier stages may validate at another resolution, so their Dice is not comparable.
    dice = [validation_dice(e) for e in stage["epochs"]]
    best = best_epoch(stage)
    recent = dice[-3:]
    if best["epoch"] >= stage["epochs"][-2]["epoch"] and len(dice) > 3:
        return f"still rising (best {best['eval_mean_dice']:.4f} in the last two epochs)"
    return (f"flattening (best {best['eval_mean_dice']:.4f} at epoch {best['epoch']} of {len(dice)}; last epochs "
            f"{', '.join(f'{d:.3f}' for d in recent)})")


def render_status(test: dict, validation: dict, stages: list[dict]) -> str:
    epochs, hours = training_summary(stages)
    mean_dice = test["metrics"]["mean_dice"]
    verdict = "meets" if mean_dice >= TARGET_MEAN_DICE else "is below"
    return (
        f"**Status.** Trained from scratch (no ImageNet weights) on a 2-core CPU: {epochs} epochs, "
        f"{hours:.1f} hours of training. Test mean Dice **{mean_dice:.4f}** (validation {validation['metrics']['mean_dice']:.4f}) "
        f"at {test['resolution']}x{test['resolution']}, which {verdict} the project's target of {TARGET_MEAN_DICE}; "
        f"the last stage's validation curve is {curve_shape(stages[-1])}. {schedule_state(stages[-1])} The seed "
        "recipe with ImageNet weights on a GPU (see Training) is the way to published-level figures."
    )


def schedule_state(stage: dict) -> str:
    planned, done = stage["invocations"][-1]["num_train_epochs"], len(stage["epochs"])
    if done >= planned:
        return f"That stage ran its whole schedule ({planned} epochs)."
    return f"These weights are from epoch {done} of that stage's {planned}-epoch schedule, which goes on."


def render_results(results: list[dict], has_figure: bool) -> str:
    parts = []
    for result in results:
        parts.append(
            f"**{result['split'].capitalize()} split** ({result['num_images']} images, "
            f"{result['resolution']}x{result['resolution']}, threshold {result['threshold']}"
            f"{', flip TTA' if result['tta'] else ''}):\n\n{format_table(result['metrics'], result['loss'])}\n"
        )
    parts.append(
        "\"Mean over images\" is the polyp literature's mDice / mIoU; \"pooled\" counts every pixel of the split once.\n"
        f"Weights sha256 `{results[0]['weights_sha256'][:16]}…`; test file list sha256 "
        f"`{results[0]['split_sha256'][:16]}…`. Reproduce (the tables are generated from the JSON these write):\n\n"
        "```bash\n" + "".join(f"{result['command']}\n" for result in results)
        + "python make_model_card.py --dataset_name ../shared/data/kvasir-seg\n```\n"
    )
    parts.append("![Training curves](assets/training_curves.png)\n")
    if has_figure:
        parts.append("![Test predictions](assets/test_predictions.png)\n\nTest frames: ground truth outline in blue, "
                     "prediction in green; frames picked across the test split's range of Dice, from the worst to the "
                     "best.\n")
    return "\n".join(parts)


def render_cpu_recipe(stages: list[dict]) -> str:
    lines = ["The shipped weights were trained in these stages, each starting from the previous one's weights "
             "(`--init_from` names the previous stage's `--output_dir`, `--init_encoder_from` takes its encoder alone; "
             "`.` is the checkpoint shipped at the root when the stage started), with these commands:\n"]
    for stage in stages:
        epochs = stage["epochs"]
        hours = stage_hours(stage)
        best = best_epoch(stage)
        config = stage["invocations"][-1]
        recipe = f", {config['train_crop_size']}x{config['train_crop_size']} crops" if config.get("train_crop_size") else ""
        if config.get("train_scale"):
            recipe += ", random resized crops of {:.0%}–{:.0%} of the area".format(*config["train_scale"])
        if config.get("model_ema_decay"):
            recipe += f", weights averaged (EMA decay {config['model_ema_decay']})"
        # A resumed run repeats its command; each distinct one is shown once, in the order first run.
        commands = list(dict.fromkeys(i["command"] for i in stage["invocations"]))
        sittings = len(stage["invocations"])
        lines.append(
            f"- **{stage['name']}**: {len(epochs)} epochs at {config['resolution']}x{config['resolution']}{recipe}, "
            f"batch {config['total_batch_size']}, learning rate {config['learning_rate']}, {hours:.2f} h"
            f"{f' in {sittings} sittings (resumed)' if sittings > 1 else ''}; best validation mDice "
            f"{best['eval_mean_dice']:.4f} at epoch {best['epoch']}."
        )
        lines.append("\n  ```bash\n" + "\n".join(f"  {command}" for command in commands) + "\n  ```")
    lines.append("\nEvery stage's `metrics.jsonl` and commands are in `training/`. To continue from the shipped "
                 "weights: `--init_from .` (a new schedule) or, with the stage's checkpoints, "
                 "`--resume_from_checkpoint latest`.")
    return "\n".join(lines)


def render_fit_probe(results: list[dict]) -> str:
    lines = ["| probe | model | config overrides | encoder | fit mean Dice | validation mean Dice |",
             "|---|---|---|---|---|---|"]
    for r in results:
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in r["config_overrides"].items()) or "-"
        validation = r.get("validation_mean_dice")
        lines.append(f"| {r.get('label') or '-'} | {r['model']} | {overrides} | "
                     f"{'from ' + r['init_encoder_from'] if r.get('init_encoder_from') else 'scratch'} | "
                     f"{r['fit_mean_dice']:.3f} | {'-' if validation is None else f'{validation:.3f}'} |")
    settings = sorted({(r["frames"], r["size"], r["steps"], r["batch_size"], r["learning_rate"]) for r in results})
    described = "; ".join(f"{f} training frames at {z}x{z}, {n} steps of batch {b}, lr {lr}" for f, z, n, b, lr in settings)
    return "\n".join(lines) + f"\n\n{described}; validation: the 60 validation frames at the same size. Each row is " \
        "one `python benchmarks/fit_probe.py --config_overrides '<JSON>' --eval_validation` run (`--seed 1` for the " \
        "rows labelled so, `--init_encoder_from <folder>` for an encoder started from saved weights)."


def plot_training_curves(stages: list[dict], path: Path) -> None:
    epochs = [e for s in stages for e in s["epochs"]]
    x = np.arange(1, len(epochs) + 1)
    fig, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(x, [e["train_loss"] for e in epochs], label="training loss")
    loss_axis.plot(x, [e["eval_loss"] for e in epochs], label="validation loss")
    dice_axis.plot(x, [validation_dice(e) for e in epochs], color="tab:green", label="validation mean Dice")
    # Stages that also scored a fixed training subset (no augmentation) show whether they under- or overfit.
    subset = [validation_dice(e, "train_eval") if "train_eval_loss" in e else float("nan") for e in epochs]
    if not np.isnan(subset).all():
        dice_axis.plot(x, subset, color="tab:blue", label="training subset mean Dice")
    # Headroom above the Dice curve for the stage labels.
    bottom, top = dice_axis.get_ylim()
    dice_axis.set_ylim(bottom, top + 0.2 * (top - bottom))
    start = 0
    for stage in stages:
        resolution = stage["invocations"][-1]["resolution"]
        if start:
            for axis in (loss_axis, dice_axis):
                axis.axvline(start + 0.5, color="grey", linestyle=":", linewidth=1)
        # Validation runs at the stage's resolution, so a jump at a boundary is a change of scale, not of the model.
        # Upright along the boundary, so that the labels of short stages do not run into each other.
        dice_axis.annotate(f"{resolution}px", xy=(start + 0.5, 1.0), xycoords=("data", "axes fraction"),
                           xytext=(2, -4), textcoords="offset points", rotation=90, ha="left", va="top",
                           fontsize=8, color="grey")
        start += len(stage["epochs"])
    # Both curves fall (loss) or rise (Dice) from left to right, leaving those corners free for the legend.
    for axis, title, corner in ((loss_axis, "BCE + Dice loss", "upper right"),
                                (dice_axis, "mean Dice", "lower right")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(loc=corner)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_test_predictions(dataset_name: str, test: dict, num_examples: int, path: Path) -> None:
    """Test frames across the range of Dice (worst, evenly spaced ranks, best), not only good ones: ranked by the
    per-image Dice of `eval/test.json`, so the figure shows the frames behind the card's table."""
    ranked = sorted(test["per_image"], key=lambda image: image["dice"])
    chosen = [ranked[rank] for rank in np.linspace(0, len(ranked) - 1, num_examples).round().astype(int)]
    samples = {sample.name: sample for sample in load_local_splits(dataset_name)[0]["test"]}
    missing = [image["name"] for image in chosen if image["name"] not in samples]
    if missing:
        raise ValueError(f"{dataset_name}: test frame(s) {', '.join(missing)} of eval/test.json are not in its test "
                         "split: evaluate.py ran on other data.")
    model, processor = load_model_and_processor(REPO_ROOT)
    fig, axes = plt.subplots(1, num_examples, figsize=(3 * num_examples, 3.4))
    for axis, image in zip(np.atleast_1d(axes), chosen):
        frame, truth = decode_sample(samples[image["name"]], resolution=test["resolution"])
        frame = frame.permute(1, 2, 0).numpy()
        with torch.inference_mode():
            outputs = model(**processor(images=frame, return_tensors="pt"))
        prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[truth.shape])[0].numpy()
        prediction, truth = prediction.astype(bool), truth.numpy().astype(bool)
        dice = 2 * (prediction & truth).sum() / max(prediction.sum() + truth.sum(), 1)
        if abs(dice - image["dice"]) > 0.01:
            raise ValueError(f"{image['name']}: Dice {dice:.3f} here but {image['dice']:.3f} in eval/test.json: "
                             "run evaluate.py again on these weights.")
        axis.imshow(overlay_mask(frame, prediction))
        axis.contour(truth, levels=[0.5], colors="blue", linewidths=1.2)
        rank = ranked.index(image)
        place = "worst" if rank == 0 else "best" if rank == len(ranked) - 1 else f"rank {rank + 1}/{len(ranked)}"
        axis.set_title(f"{place}: Dice {image['dice']:.3f}", fontsize=10)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_training_speed(result: dict) -> str:
    steps = result["step_alone"]
    baseline = steps[0]["frames_per_second"]
    lines = [f"| training step alone (batch {result['batch_size']}, {result['crop']}x{result['crop']} crops) | "
             f"frames/s | x {steps[0]['variant']} |", "|---|---:|---:|"]
    lines += [f"| {s['variant']} | {s['frames_per_second']:.2f} | {s['frames_per_second'] / baseline:.2f} |" for s in steps]
    lines += ["", "| float32 matrix product | matmul precision | GFLOP/s | relative error |", "|---|---|---:|---:|"]
    lines += [f"| {'x'.join(map(str, p['shape']))} | {p['float32_matmul_precision']} | {p['gflop_per_second']:.0f} | "
              f"{p['relative_error']:.1e} |" for p in result["matrix_products"]]
    return "\n".join(lines) + (
        f"\n\nThe input pipeline alone: {result['pipeline_frames_per_second_per_core']:.0f} frames/s on one core; with "
        f"the DataLoader feeding the step ({result['train_variant']}): {result['train_frames_per_second']:.2f} frames/s. "
        f"{result['device_name']} ({result['device']}, {result['cores']} cores), torch {result['torch']}; "
        f"measured with `{result['command']}`.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    eval_dir, readme = Path(args.eval_dir), Path(args.readme)
    # The test table leads (the model-index holds its figures); flip TTA, if measured, follows it.
    names = ["test.json", "validation.json"]
    if (eval_dir / "test_tta.json").is_file():
        names.insert(1, "test_tta.json")
    results = [json.loads((eval_dir / name).read_text()) for name in names]
    test, validation = results[0], results[-1]
    weights = REPO_ROOT / "model.safetensors"
    for name, result in zip(names, results):
        if result["weights_sha256"] != sha256(weights):
            raise ValueError(f"{eval_dir / name} was measured on other weights than {weights}: run evaluate.py again.")
    stages = load_stages(Path(args.training_dir))
    assets = Path(args.assets_dir)
    assets.mkdir(exist_ok=True)
    plot_training_curves(stages, assets / "training_curves.png")
    has_figure = args.dataset_name is not None
    if has_figure:
        plot_test_predictions(args.dataset_name, test, args.num_examples, assets / "test_predictions.png")

    text = readme.read_text()
    text = replace_model_index(text, test)
    text = replace_block(text, "status", render_status(test, validation, stages))
    text = replace_block(text, "results", render_results(results, has_figure))
    text = replace_block(text, "cpu-recipe", render_cpu_recipe(stages))
    fit_probe_results = Path(args.fit_probe_results)
    if fit_probe_results.is_file():
        text = replace_block(text, "fit-probe", render_fit_probe(load_jsonl(fit_probe_results)))
    training_speed_results = Path(args.training_speed_results)
    if training_speed_results.is_file():
        training_speed = json.loads(training_speed_results.read_text())
        text = replace_block(text, "training-speed", render_training_speed(training_speed))
    readme.write_text(text)
    print(f"Updated {readme} and {assets}/.")


if __name__ == "__main__":
    main()
