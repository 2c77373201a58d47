#!/usr/bin/env python
"""Writes the model card (README.md) and the generated parts of docs/ from the files that measured them.

    python evaluate_model.py --model . --dataset_name ../shared/data/kvasir-seg --split validation \
        --negative_dataset_name ../shared/data/nopolyp --output_json eval/validation.json
    python evaluate_model.py --model . --dataset_name ../shared/data/kvasir-seg --split test --output_json eval/test.json
    python evaluate_model.py --model . --dataset_name ../shared/data/kvasir-seg --split test --tta --output_json eval/test_tta.json
    python make_model_card.py --dataset_name ../shared/data/kvasir-seg --negative_dataset_name ../shared/data/nopolyp

The card is `docs/model_card_template.md` filled in through `huggingface_hub.ModelCard`, its metadata (the
`model-index` included) made by `ModelCardData` and `EvalResult` from `eval/test.json`; its status, results and
training summary come from `eval/*.json` (written by evaluate_model.py for the weights at the root; `test_tta.json` is
optional) and `training/<stage>/` (the shipped run's `metrics.jsonl` and `invocations.jsonl`, and its best model's
`eval_results.json`, which names the shipped epoch; without it, the last epoch was shipped). In docs/, it rewrites
the shipped run's recipe and the training speed (`docs/training.md`, from `benchmarks/train_cpu.json`), the fit-probe
table (`docs/architecture.md`, from `benchmarks/fit_probe.jsonl`) and the performance table (`docs/performance.md`,
from `benchmarks/cpu.json`); and the figures in `assets/`. Nothing in those parts is typed by hand.
"""

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import EvalResult, ModelCard, ModelCardData  # noqa: E402
from safetensors import safe_open  # noqa: E402

from polyp_segmentation.data import decode_sample, load_local_splits, load_negative_splits  # noqa: E402
from polyp_segmentation.drawing import overlay_mask  # noqa: E402
from polyp_segmentation.loading import file_sha256, load_model_and_processor  # noqa: E402
from polyp_segmentation.metrics import METRIC_NAMES  # noqa: E402
from polyp_segmentation.reports import render_fit_probe, render_performance, render_training_speed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent
TARGET_MEAN_DICE = 0.85
MODEL_NAME = "attention-unet-convnext-tiny-kvasir-seg"
CARD_TEMPLATE = REPO_ROOT / "docs" / "model_card_template.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    parser.add_argument("--docs_dir", default=str(REPO_ROOT / "docs"))
    parser.add_argument("--eval_dir", default=str(REPO_ROOT / "eval"))
    parser.add_argument("--training_dir", default=str(REPO_ROOT / "training"))
    parser.add_argument("--assets_dir", default=str(REPO_ROOT / "assets"))
    parser.add_argument("--dataset_name", default=None,
                        help="Local Kvasir-SEG folder for the prediction figure (skipped without it).")
    parser.add_argument("--num_examples", type=int, default=5,
                        help="Frames in each prediction figure, from the worst to the best.")
    parser.add_argument("--negative_dataset_name", default=None,
                        help="Local folder of polyp-free frames (the one eval/validation.json was scored on) for the "
                             "figure of what the model marks on them (skipped without it).")
    parser.add_argument("--fit_probe_results", default=str(REPO_ROOT / "benchmarks" / "fit_probe.jsonl"),
                        help="Results of benchmarks/fit_probe.py --output_jsonl, for the fit-probe table.")
    parser.add_argument("--training_speed_results", default=str(REPO_ROOT / "benchmarks" / "train_cpu.json"),
                        help="Results of benchmarks/bench_train.py --output_json, for the training-speed table.")
    parser.add_argument("--performance_results", default=str(REPO_ROOT / "benchmarks" / "cpu.json"),
                        help="Results of benchmarks/bench_cpu.py --output_json, for the performance table.")
    parser.add_argument("--int8_performance_results", default=str(REPO_ROOT / "benchmarks" / "cpu_int8.json"),
                        help="Results of the bench_cpu.py run with the OpenVINO rows, for the int8 table and the "
                             "card's speed line.")
    parser.add_argument("--int8_avx2_performance_results",
                        default=str(REPO_ROOT / "benchmarks" / "cpu_int8_avx2.json"),
                        help="The same run with oneDNN capped to AVX2 (no VNNI), for the int8 table without VNNI.")
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
        epochs = load_jsonl(folder / "metrics.jsonl")
        best_model = folder / "eval_results.json"
        shipped = json.loads(best_model.read_text())["epoch"] if best_model.exists() else epochs[-1]["epoch"]
        stages.append({"name": folder.name, "epochs": epochs, "invocations": invocations, "shipped_epoch": shipped})
    return sorted(stages, key=stage_started)


def stage_started(stage: dict) -> datetime:
    return datetime.strptime(stage["invocations"][0]["started"], "%Y-%m-%dT%H:%M:%S%z")


def read_block(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"The document has no {start} ... {end} block.")
    return text.split(start, 1)[1].split(end, 1)[0]


def replace_block(text: str, name: str, content: str) -> str:
    start = f"<!-- {name}:start -->"
    return text.replace(start + read_block(text, name), f"{start}\n{content.strip()}\n", 1)


def card_data(test: dict) -> ModelCardData:
    """The card's metadata; its `model-index` holds the test split's figures."""
    dataset = dict(dataset_type="kowndinya23/Kvasir-SEG", dataset_split="test",
                   dataset_name="Kvasir-SEG (fixed 60-image test half of the official validation split)")
    results = [
        EvalResult(task_type="image-segmentation", task_name="Polyp segmentation", **dataset,
                   metric_type=f"mean_{name}", metric_value=round(test["metrics"][f"mean_{name}"], 4),
                   metric_name=f"mean {name} over images ({test['resolution']}x{test['resolution']})")
        for name in METRIC_NAMES if name != "f1"  # F1 is Dice for one binary class
    ]
    results.append(EvalResult(task_type="image-segmentation", task_name="Polyp segmentation", **dataset,
                              metric_type="pooled_dice", metric_value=round(test["metrics"]["pooled_dice"], 4),
                              metric_name="Dice pooled over all pixels"))
    return ModelCardData(
        library_name="transformers", pipeline_tag="image-segmentation", license="apache-2.0",
        tags=["medical-imaging", "polyp-segmentation", "colonoscopy", "attention-unet", "convnext", "timm"],
        datasets=["kowndinya23/Kvasir-SEG"], model_name=MODEL_NAME, eval_results=results,
    )


def stage_hours(stage: dict) -> float:
    return sum(e["data_seconds"] + e["model_seconds"] + e["eval_seconds"] for e in stage["epochs"]) / 3600


def validation_dice(epoch: dict, prefix: str = "eval") -> float:
    """The epoch's mean Dice, NaN where its loss was not finite: non-finite weights score 0 without being measured
    (epochs 60-64 of the shipped run, validated with a BatchNorm variance stored as inf)."""
    return epoch[f"{prefix}_mean_dice"] if np.isfinite(epoch[f"{prefix}_loss"]) else float("nan")


def best_epoch(stage: dict) -> dict:
    return max((e for e in stage["epochs"] if np.isfinite(validation_dice(e))), key=validation_dice)


def curve_shape(stage: dict) -> str:
    dice = [validation_dice(e) for e in stage["epochs"]]
    best = best_epoch(stage)
    recent = dice[-3:]
    if best["epoch"] >= stage["epochs"][-2]["epoch"] and len(dice) > 3:
        return f"still rising (best {best['eval_mean_dice']:.4f} in the last two epochs)"
    return (f"flattening (best {best['eval_mean_dice']:.4f} at epoch {best['epoch']} of {len(dice)}; last epochs "
            f"{', '.join(f'{d:.3f}' for d in recent)})")


def schedule_state(stage: dict) -> str:
    planned, done = stage["invocations"][-1]["num_train_epochs"], len(stage["epochs"])
    if done >= planned:
        if stage["shipped_epoch"] == done:
            return f"That run went through its whole schedule ({planned} epochs)."
        return (f"That run went through its whole schedule ({planned} epochs); the shipped weights are its epoch "
                f"{stage['shipped_epoch']}, the best on validation mDice and polyp-free frames left quiet together "
                "(`selection_score`).")
    return f"These weights are from epoch {done} of that run's {planned}-epoch schedule, which goes on."


def render_status(test: dict, validation: dict, stage: dict) -> str:
    mean_dice = test["metrics"]["mean_dice"]
    verdict = "meets" if mean_dice >= TARGET_MEAN_DICE else "is below"
    return (
        f"**Status.** Test mean Dice **{mean_dice:.4f}** (validation {validation['metrics']['mean_dice']:.4f}) at "
        f"{test['resolution']}x{test['resolution']}, which {verdict} the project's target of {TARGET_MEAN_DICE}; "
        f"trained from scratch (no ImageNet weights) on a 2-core CPU. The shipped run's validation curve is "
        f"{curve_shape(stage)}. {schedule_state(stage)}"
    )


# How the card names the polyp-free frames of each `negatives` entry of evaluate_model.py's JSON.
POLYP_FREE_SOURCES = {"negatives": "polyp-free validation frames of another collection",
                      "own_crops": "random polyp-free squares of Kvasir-SEG validation frames (border included)",
                      "largest_crops": "largest polyp-free squares of Kvasir-SEG validation frames, away from the border"}


def render_limitations(validation: dict) -> str:
    negatives = validation.get("negatives")
    if not negatives:
        return "- Not measured on frames without a polyp."
    shares = [f"{entry['false_alarm_rate']:.0%} of {entry['num_images']} {POLYP_FREE_SOURCES[key]}"
              for key, entry in negatives.items()]
    listed = ", ".join(shares[:-1]) + " and " * (len(shares) > 1) + shares[-1]
    return (f"- On frames without a polyp, the raw logits (threshold {validation['threshold']}) mark more than 1 % of "
            f"the frame on {listed} (Evaluation below).")


def render_results(test: dict, test_tta: dict | None, validation: dict, has_figure: bool,
                   test_int8: dict | None = None, has_polyp_free_figure: bool = False) -> str:
    columns = [("test", test)] + ([("test, flip TTA", test_tta)] if test_tta else []) + [("validation", validation)]
    columns += [("test, int8 (OpenVINO)", test_int8)] if test_int8 else []
    lines = ["| metric | " + " | ".join(f"{name}: mean over images | {name}: pooled" for name, _ in columns) + " |",
             "|---|" + "---:|---:|" * len(columns)]
    for metric in METRIC_NAMES:
        figures = (f"{r['metrics'][f'mean_{metric}']:.4f} | {r['metrics'][f'pooled_{metric}']:.4f}" for _, r in columns)
        lines.append(f"| {metric} | " + " | ".join(figures) + " |")
    lines.append("| loss (BCE + Dice) | " + " | ".join(f"{r['loss']:.4f} | " for _, r in columns) + " |")
    parts = [
        f"Kvasir-SEG, {test['num_images']} test and {validation['num_images']} validation frames at "
        f"{test['resolution']}x{test['resolution']}, threshold {test['threshold']}:\n\n" + "\n".join(lines)
    ]
    if validation.get("negatives"):
        parts.append(render_polyp_free_results(test, validation))
    # The int8 model is a build output, not in the repository: its evaluation needs the export first.
    commands = [(f"make int8  # builds {r['openvino']} with export_openvino.py and runs:\n" if r.get("openvino") else "")
                + r["command"] for _, r in columns]
    parts.append(
        f"Weights sha256 `{test['weights_sha256'][:16]}…`; test file list sha256 `{test['split_sha256'][:16]}…`. "
        "Reproduce (the tables are generated from the JSON these write):\n\n```bash\n" + "\n".join(commands)
        + "\npython make_model_card.py --dataset_name ../shared/data/kvasir-seg --negative_dataset_name "
        "../shared/data/nopolyp\n```"
    )
    parts.append("![Training curves](assets/training_curves.png)")
    if has_figure:
        parts.append("![Test predictions](assets/test_predictions.png)\n\nTest frames across the split's range of "
                     "Dice, worst to best: ground truth outline in blue, prediction in green.")
    if has_polyp_free_figure:
        parts.append("![Polyp-free frames](assets/polyp_free_predictions.png)\n\nPolyp-free validation frames, from "
                     "the quietest to the one the raw logits mark most: in green what `logits.sigmoid() > "
                     f"{validation['threshold']}` marks, above each its share of the frame, the frame's polyp score "
                     "and the decision at the presence threshold.")
    return "\n\n".join(parts)


def render_polyp_free_results(test: dict, validation: dict) -> str:
    """The frame-level decision (polyp score against the presence threshold) and what the raw logits mark on each
    source of polyp-free frames."""
    presence_threshold = validation["presence_threshold"]
    if presence_threshold is None:
        decision = (f"No presence threshold is set: a frame is judged to hold a polyp where any pixel passes "
                    f"{validation['threshold']}.")
    else:
        decision = (f"At the presence threshold {presence_threshold:.3f} (`config.json`, chosen on the validation "
                    f"frames) the score finds a polyp in {validation['frame_sensitivity']:.3f} of the validation and "
                    f"{test['frame_sensitivity']:.3f} of the test frames.")
    rows = [("| polyp-free frames | frames | > 1 % marked (raw logits) | any pixel marked | judged polyp-free | "
             "score ROC AUC |"), "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {POLYP_FREE_SOURCES[key]} | {e['num_images']} | {e['false_alarm_rate']:.3f} | "
             f"{e['any_pixel_rate']:.3f} | {e['specificity']:.3f} | {e['roc_auc_max_probability']:.3f} |"
             for key, e in validation["negatives"].items()]
    return (f"Frames without a polyp. A frame's polyp score is its highest pixel probability; its ROC AUC is against "
            f"the validation frames with a polyp. {decision}\n\n" + "\n".join(rows))


def render_cpu_speed(report: dict | None) -> str:
    """One line of the int8 benchmark for the card: batch-1 latency per runtime and the end-to-end video rate."""
    if report is None:
        return ""
    ours = report["results"][0]
    runtimes = {"eager": "PyTorch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO float32",
                "openvino_int8": "OpenVINO int8"}
    latencies = [f"{label} {ours['variants'][variant]['latency_ms']:.0f} ms" for variant, label in runtimes.items()
                 if "latency_ms" in ours["variants"].get(variant, {})]
    video = ours.get("video", {})
    rates = [f"{runtimes[variant]} {figures['frames_per_second']:.1f}" for variant, figures in video.items()]
    machine = report["machine"]
    return (f" Batch-1 latency at {report['settings']['resolution']}x{report['settings']['resolution']} on "
            f"{report['settings']['threads']} cores of an {machine['model_name']}: " + ", ".join(latencies)
            + (f"; predict.py on a video, end to end (frames/s): {', '.join(rates)}" if rates else "") + ".")


def polyp_free_items(config: dict) -> str:
    """The share of polyp-free items, and what they were cut from where the run logged it."""
    text = f"{config['negative_ratio']:.0%} polyp-free items"
    if config.get("own_negative_share") is None:
        return text
    near = (f", {config['near_polyp_share']:.0%} of those just past the polyp" if config.get("near_polyp_share")
            else "")
    return f"{text} ({config['own_negative_share']:.0%} of them crops of the training frames{near})"


def describe_recipe(config: dict) -> str:
    parts = [f"{config['resolution']}x{config['resolution']} frames"]
    if config.get("train_crop_size"):
        parts.append(f"{config['train_crop_size']}x{config['train_crop_size']} crops")
    if config.get("train_scale_jitter"):
        parts.append("zoom {}-{}".format(*config["train_scale_jitter"]))
    if config.get("negative_ratio"):
        parts.append(polyp_free_items(config))
    if config.get("final_full_frame_epochs"):
        parts.append(f"the last {config['final_full_frame_epochs']} epochs on whole frames")
    parts.append(f"AdamW at {config['learning_rate']} with cosine decay, batch {config['total_batch_size']}")
    if config.get("model_ema_decay"):
        parts.append(f"an EMA of the weights ({config['model_ema_decay']})")
    return ", ".join(parts)


def stage_start(invocation: dict) -> str:
    """What a stage's run started from: the weights at the root (the previous stage's), or a folder named after an
    earlier stage whose weights were taken from git (`git archive <commit>`)."""
    if invocation.get("init_encoder_from"):
        return "with a new decoder on the previous stage's encoder"
    if not invocation.get("init_from"):
        return "from scratch"
    init_from = invocation["init_from"]
    if init_from == ".":
        return "from the previous stage's weights"
    folder = Path(init_from).name
    return f"from {folder}'s weights" if re.fullmatch(r"stage\d+", folder) else f"from the weights in `{init_from}`"


def render_training_summary(stage: dict) -> str:
    first = stage["invocations"][0]
    return (f"the shipped weights are the moving average of the weights at the end of epoch {stage['shipped_epoch']} "
            f"of one run of `train_accelerate.py` (`training/{stage['name']}/`): {len(stage['epochs'])} epochs "
            f"{stage_start(first)}, "
            f"{describe_recipe(first)}; {stage_hours(stage):.1f} hours on 2 CPU cores.")


def lineage_row(stage: dict) -> str:
    first = stage["invocations"][0]
    recipe = [stage_start(first)]
    if first.get("train_crop_size"):
        recipe.append(f"{first['train_crop_size']}px crops")
    if first.get("train_scale_jitter"):
        recipe.append("zoom {}-{}".format(*first["train_scale_jitter"]))
    if first.get("negative_ratio"):
        recipe.append(polyp_free_items(first))
    if first.get("model_ema_decay"):
        recipe.append(f"EMA {first['model_ema_decay']}")
    recipe.append(f"lr {first['learning_rate']}, batch {first['total_batch_size']}")
    best = best_epoch(stage)
    return (f"| {stage['name']} | {stage_started(stage):%Y-%m-%d} | {len(stage['epochs'])} | {first['resolution']} | "
            f"{'; '.join(recipe)} | {stage_hours(stage):.2f} | {best['eval_mean_dice']:.4f} (epoch {best['epoch']}) |")


def render_lineage(table: str, stages: list[dict]) -> str:
    """The lineage table with a generated row per stage in `stages` (those whose logs are in training/), after the
    table's rows of earlier stages, whose logs have left the tree."""
    lines = table.strip().splitlines()
    in_tree = {stage["name"] for stage in stages}
    earlier = [row for row in lines[2:] if row.split("|")[1].strip() not in in_tree]
    return "\n".join(lines[:2] + earlier + [lineage_row(stage) for stage in stages])


def render_shipped_run(stage: dict) -> str:
    best = best_epoch(stage)
    # A resumed run repeats its command; each distinct one is shown once, in the order first run.
    commands = list(dict.fromkeys(i["command"] for i in stage["invocations"]))
    sittings = len(stage["invocations"])
    return (f"**{stage['name']}**: {len(stage['epochs'])} epochs, {describe_recipe(stage['invocations'][0])}; "
            f"{stage_hours(stage):.2f} h in {sittings} sitting{'s' * (sittings != 1)}; best validation mDice "
            f"{best['eval_mean_dice']:.4f} at epoch {best['epoch']}; shipped: epoch {stage['shipped_epoch']}. Its "
            "commands, in the order they first ran:\n\n"
            "```bash\n" + "\n".join(commands) + "\n```")


def count_parameters(weights: Path) -> float:
    with safe_open(str(weights), framework="pt") as tensors:
        return sum(int(np.prod(tensors.get_slice(name).get_shape())) for name in tensors.keys()
                   if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))) / 1e6


def plot_training_curves(stage: dict, path: Path) -> None:
    epochs = stage["epochs"]
    x = [e["epoch"] for e in epochs]
    false_alarms = [e.get("eval_negatives_false_alarm_rate", float("nan")) for e in epochs]
    panels = 2 if np.isnan(false_alarms).all() else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    loss_axis, dice_axis = axes[:2]
    loss_axis.plot(x, [e["train_loss"] for e in epochs], label="training loss")
    loss_axis.plot(x, [e["eval_loss"] for e in epochs], label="validation loss")
    dice_axis.plot(x, [validation_dice(e) for e in epochs], color="tab:green", label="validation mean Dice")
    # A fixed training subset scored without augmentation shows whether the run under- or overfits.
    subset = [validation_dice(e, "train_eval") if "train_eval_loss" in e else float("nan") for e in epochs]
    if not np.isnan(subset).all():
        dice_axis.plot(x, subset, color="tab:blue", label="training subset mean Dice")
    # Both curves fall (loss, false alarms) or rise (Dice) from left to right, leaving those corners for the legend.
    titles = [(loss_axis, "BCE + Dice loss", "upper right"), (dice_axis, "mean Dice", "lower right")]
    if panels == 3:
        axes[2].plot(x, false_alarms, color="tab:red", label="polyp-free validation frames > 1 % marked")
        titles.append((axes[2], "false alarms", "upper right"))
    for axis, title, corner in titles:
        if stage["shipped_epoch"] != x[-1]:
            axis.axvline(stage["shipped_epoch"], color="grey", linestyle="--", label="shipped epoch")
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(loc=corner)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frames_at_ranks(ranked: list[dict], num_examples: int, samples: dict, not_found: str) -> list[tuple[int, dict]]:
    """`num_examples` entries of `ranked` at evenly spaced ranks, first and last included, as (rank, entry). Refuses,
    naming them, entries whose frame is not in `samples`: `not_found` is the message, with `{names}` in it."""
    ranks = np.linspace(0, len(ranked) - 1, num_examples).round().astype(int)
    missing = [ranked[rank]["name"] for rank in ranks if ranked[rank]["name"] not in samples]
    if missing:
        raise ValueError(not_found.format(names=", ".join(missing)))
    return [(int(rank), ranked[rank]) for rank in ranks]


def save_panels(panels: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, str]], height: float, path: Path) -> None:
    """One row of (frame, what the model marks, ground truth or None, title) panels: marks in green, truth outlined."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), height))
    for axis, (frame, marked, truth, title) in zip(np.atleast_1d(axes), panels):
        axis.imshow(overlay_mask(frame, marked))
        if truth is not None:
            axis.contour(truth, levels=[0.5], colors="blue", linewidths=1.2)
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_test_predictions(dataset_name: str, test: dict, num_examples: int, path: Path) -> None:
    """Test frames across the range of Dice (worst, evenly spaced ranks, best), not only good ones: ranked by the
    per-image Dice of `eval/test.json`, so the figure shows the frames behind the card's table."""
    ranked = sorted(test["per_image"], key=lambda image: image["dice"])
    samples = {sample.name: sample for sample in load_local_splits(dataset_name)[0]["test"]}
    chosen = frames_at_ranks(ranked, num_examples, samples,
                             f"{dataset_name}: test frame(s) {{names}} of eval/test.json are not in its test split: "
                             "evaluate_model.py ran on other data.")
    model, processor = load_model_and_processor(REPO_ROOT)
    panels = []
    for rank, image in chosen:
        frame, truth = decode_sample(samples[image["name"]], resolution=test["resolution"])
        frame = frame.permute(1, 2, 0).numpy()
        with torch.inference_mode():
            outputs = model(**processor(images=frame, return_tensors="pt"))
        prediction = processor.post_process_semantic_segmentation(
            outputs, target_sizes=[truth.shape], presence_threshold=test.get("presence_threshold"))[0].numpy()
        prediction, truth = prediction.astype(bool), truth.numpy().astype(bool)
        dice = 2 * (prediction & truth).sum() / max(prediction.sum() + truth.sum(), 1)
        if abs(dice - image["dice"]) > 0.01:
            raise ValueError(f"{image['name']}: Dice {dice:.3f} here but {image['dice']:.3f} in eval/test.json: "
                             "run evaluate_model.py again on these weights.")
        place = "worst" if rank == 0 else "best" if rank == len(ranked) - 1 else f"rank {rank + 1}/{len(ranked)}"
        panels.append((frame, prediction, truth, f"{place}: Dice {image['dice']:.3f}"))
    save_panels(panels, 3.4, path)


def plot_polyp_free_predictions(negative_dataset_name: str, validation: dict, num_examples: int,
                                path: Path) -> None:
    """Polyp-free validation frames from the quietest to the one the raw logits mark most (evenly spaced ranks of the
    marked area in `eval/validation.json`), each with what `logits.sigmoid() > threshold` marks and the frame's
    polyp score and decision."""
    scored = validation["negatives"]["negatives"]
    if "per_image" not in scored:
        raise ValueError("eval/validation.json holds no per-frame figures of the polyp-free frames: run "
                         "evaluate_model.py --negative_dataset_name again.")
    ranked = sorted(scored["per_image"], key=lambda image: (image["marked_fraction"], image["polyp_score"]))
    samples = {sample.name: sample for sample in load_negative_splits(negative_dataset_name)["validation"]}
    chosen = frames_at_ranks(ranked, num_examples, samples,
                             f"{negative_dataset_name}: frame(s) {{names}} of eval/validation.json are not in its "
                             "validation split: evaluate_model.py ran on other polyp-free frames.")
    model, processor = load_model_and_processor(REPO_ROOT)
    panels = []
    for _, image in chosen:
        frame = decode_sample(samples[image["name"]], resolution=validation["resolution"])[0].permute(1, 2, 0).numpy()
        with torch.inference_mode():
            logits = model(**processor(images=frame, return_tensors="pt")).logits
        marked = (logits.sigmoid() > validation["threshold"])[0, 0].numpy()
        if abs(marked.mean() - image["marked_fraction"]) > 0.01:
            raise ValueError(f"{image['name']}: {marked.mean():.1%} marked here but {image['marked_fraction']:.1%} in "
                             "eval/validation.json: run evaluate_model.py again on these weights.")
        verdict = "polyp" if image["polyp_present"] else "no polyp"
        panels.append((frame, marked, None,
                       f"marked {image['marked_fraction']:.1%}\nscore {image['polyp_score']:.2f}: {verdict}"))
    save_panels(panels, 3.6, path)


def update_document(path: Path, blocks: dict[str, str]) -> None:
    text = path.read_text()
    for name, content in blocks.items():
        text = replace_block(text, name, content)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    eval_dir, readme, docs = Path(args.eval_dir), Path(args.readme), Path(args.docs_dir)
    names = ["test.json", "test_tta.json", "validation.json", "test_int8.json"]
    results = {name: json.loads((eval_dir / name).read_text()) for name in names if (eval_dir / name).is_file()}
    weights = REPO_ROOT / "model.safetensors"
    for name, result in results.items():
        if result["weights_sha256"] != file_sha256(weights):
            raise ValueError(f"{eval_dir / name} was measured on other weights than {weights}: run evaluate_model.py again.")
    test, test_tta, validation, test_int8 = (results.get(name) for name in names)
    int8_performance = (json.loads(Path(args.int8_performance_results).read_text())
                        if Path(args.int8_performance_results).is_file() else None)
    # The shipped weights come from the last run in training/.
    stages = load_stages(Path(args.training_dir))
    stage = stages[-1]
    assets = Path(args.assets_dir)
    assets.mkdir(exist_ok=True)
    plot_training_curves(stage, assets / "training_curves.png")
    has_figure = args.dataset_name is not None
    if has_figure:
        plot_test_predictions(args.dataset_name, test, args.num_examples, assets / "test_predictions.png")
    has_polyp_free_figure = args.negative_dataset_name is not None and "negatives" in validation
    if has_polyp_free_figure:
        plot_polyp_free_predictions(args.negative_dataset_name, validation, args.num_examples,
                                    assets / "polyp_free_predictions.png")

    card = ModelCard.from_template(
        card_data(test), template_path=str(CARD_TEMPLATE), status=render_status(test, validation, stage),
        num_parameters=f"{count_parameters(weights):.1f}", limitations=render_limitations(validation),
        training_summary=render_training_summary(stage),
        results=render_results(test, test_tta, validation, has_figure, test_int8, has_polyp_free_figure),
        cpu_speed=render_cpu_speed(int8_performance),
    )
    readme.write_text(str(card).rstrip("\n") + "\n")
    update_document(docs / "training.md", {"shipped-run": render_shipped_run(stage)} | (
        {"training-speed": render_training_speed(json.loads(Path(args.training_speed_results).read_text()))}
        if Path(args.training_speed_results).is_file() else {}))
    lineage = docs / "lineage.md"
    update_document(lineage, {"lineage": render_lineage(read_block(lineage.read_text(), "lineage"), stages)})
    if Path(args.fit_probe_results).is_file():
        update_document(docs / "architecture.md",
                        {"fit-probe": render_fit_probe(load_jsonl(Path(args.fit_probe_results)))})
    if Path(args.performance_results).is_file():
        update_document(docs / "performance.md",
                        {"performance": render_performance(json.loads(Path(args.performance_results).read_text()))})
    if int8_performance is not None:
        update_document(docs / "performance.md", {"int8-performance": render_performance(int8_performance)})
    if Path(args.int8_avx2_performance_results).is_file():
        update_document(docs / "performance.md", {"int8-performance-avx2": render_performance(
            json.loads(Path(args.int8_avx2_performance_results).read_text()))})
    print(f"Wrote {readme}, the generated parts of {docs}/ and {assets}/.")


if __name__ == "__main__":
    main()
