"""Polyp-free training data: the polyp-free crops never hold a polyp pixel, the mixture's share and its draws per
(seed, epoch, index), training with it (false alarms logged, exact mid-epoch resume), the loss on empty masks, and
evaluate_model.py's false-alarm figures."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyp_segmentation.data import (
    PolypMixtureDataset,
    crop_resized,
    largest_polyp_free_box,
    load_negative_splits,
    near_polyp_free_box,
    polyp_closeup_box,
    polyp_free_box,
    polyp_free_crops,
)
from polyp_segmentation.testing import (
    REPO_ROOT,
    TINY_OVERRIDES,
    assert_same_weights,
    final_weights,
    make_model,
    run_training,
)


def ellipse_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centre_row, centre_column = (top + bottom) / 2, (left + right) / 2
    radius_row, radius_column = max((bottom - top) / 2, 0.5), max((right - left) / 2, 0.5)
    return ((rows - centre_row) / radius_row) ** 2 + ((columns - centre_column) / radius_column) ** 2 <= 1


masks = st.builds(
    lambda height, width, a, b, c, d: ellipse_mask(height, width, *sorted((int(a * height), int(b * height))),
                                                   *sorted((int(c * width), int(d * width)))),
    st.integers(48, 160), st.integers(48, 160), *(st.floats(0, 1) for _ in range(4)),
)


@settings(max_examples=60, deadline=None)
@given(mask=masks, seed=st.integers(0, 2**31))
def test_polyp_free_crops_never_hold_a_mask_pixel(mask, seed):
    box = polyp_free_box(mask, torch.Generator().manual_seed(seed))
    if box is None:
        return
    top, left, side = box
    assert side >= 1 and top + side <= mask.shape[0] and left + side <= mask.shape[1]
    assert not mask[top:top + side, left:left + side].any()
    image = torch.randint(0, 256, (3, *mask.shape), dtype=torch.uint8)
    cropped_image, cropped_mask = crop_resized(image, mask, box)
    assert cropped_image.shape == image.shape and not cropped_mask.any()


def near_polyp_or_dark(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pixels within 4 % of the shorter side of the polyp or of a dark pixel, by brute force."""
    pad = max(1, round(0.04 * min(mask.shape)))
    return torch.nn.functional.max_pool2d((mask | (image.max(0).values < 30))[None, None].float(), 2 * pad + 1,
                                          stride=1, padding=pad)[0, 0] > 0


@settings(max_examples=40, deadline=None)
@given(mask=masks, border=st.integers(0, 20), text_box=st.booleans())
def test_largest_polyp_free_crop_keeps_away_from_polyp_and_border_and_is_the_largest(mask, border, text_box):
    height, width = mask.shape
    image = torch.full((3, height, width), 120, dtype=torch.uint8)
    image[:, :border], image[:, :, :border] = 0, 0  # a black border on two sides
    if text_box:  # the on-screen text's black box, white text inside
        image[:, height // 2:, :width // 3] = 0
        image[:, height // 2 + 4:height // 2 + 6, 2:width // 3 - 2] = 255
    keep_out = near_polyp_or_dark(image, mask)

    def clear(top: int, left: int, side: int) -> bool:
        return not keep_out[top:top + side, left:left + side].any()

    box = largest_polyp_free_box(image, mask)
    smallest = max(1, round(0.25 * min(height, width)))
    if box is None:
        assert not any(clear(t, l, smallest) for t in range(height - smallest + 1) for l in range(width - smallest + 1))
        return
    top, left, side = box
    assert side >= smallest and top + side <= height and left + side <= width and clear(top, left, side)
    if side < min(height, width):
        assert not any(clear(t, l, side + 1) for t in range(height - side) for l in range(width - side))


@settings(max_examples=40, deadline=None)
@given(mask=masks, seed=st.integers(0, 2**31))
def test_near_polyp_crop_keeps_the_margin_and_lies_nearest_the_polyp(mask, seed):
    image = torch.full((3, *mask.shape), 120, dtype=torch.uint8)
    image[:, :6] = 0  # a black border along the top
    box = near_polyp_free_box(image, mask, torch.Generator().manual_seed(seed))
    largest = largest_polyp_free_box(image, mask)
    if not mask.any() or largest is None:
        assert box is None
        return
    top, left, side = box
    keep_out = near_polyp_or_dark(image, mask)
    assert round(0.25 * min(mask.shape)) <= side <= largest[2] and not keep_out[top:top + side, left:left + side].any()
    centre = mask.nonzero().float().mean(dim=0)

    def distance(t: int, l: int) -> float:
        return float(((torch.tensor([t, l]) + (side - 1) / 2 - centre) ** 2).sum())

    height, width = mask.shape
    assert all(distance(top, left) <= distance(t, l) + 1e-3 for t in range(height - side + 1)
               for l in range(width - side + 1) if not keep_out[t:t + side, l:l + side].any())


@settings(max_examples=60, deadline=None)
@given(mask=masks, seed=st.integers(0, 2**31))
def test_closeup_crops_hold_the_whole_polyp(mask, seed):
    box = polyp_closeup_box(mask, torch.Generator().manual_seed(seed))
    if not mask.any():
        assert box is None
        return
    top, left, side = box
    assert top >= 0 and left >= 0 and top + side <= mask.shape[0] and left + side <= mask.shape[1]
    rows, columns = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    extent = max(int(rows[-1] - rows[0]), int(columns[-1] - columns[0])) + 1
    inside = mask[top:top + side, left:left + side].sum()
    if extent <= min(mask.shape):
        assert inside == mask.sum()
    else:  # a polyp longer than the frame's shorter side: as much of it as a square holds
        assert inside > 0


def test_validation_crops_exist_for_most_real_frames_and_repeat(kvasir_root):
    from polyp_segmentation.data import decode_samples, load_local_splits

    names, images, masks, _ = decode_samples(load_local_splits(kvasir_root)[0]["validation"][:20], 256)
    crop_names, crops = polyp_free_crops(names, images, masks)
    assert len(crops) >= 15 and all(crop.shape == (3, 256, 256) for crop in crops)
    assert set(crop_names) <= {f"{name} crop" for name in names} and len(set(crop_names)) == len(crops)
    assert all(torch.equal(a, b) for a, b in zip(crops, polyp_free_crops(names, images, masks)[1]))


def mixture(ratio: float = 0.25, **kwargs) -> PolypMixtureDataset:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=generator) for _ in range(12)]
    masks = [ellipse_mask(64, 64, 20, 20 + i, 40, 44 + i) for i in range(12)]
    negatives = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=generator) for _ in range(5)]
    return PolypMixtureDataset([str(i) for i in range(12)], images, masks, negatives, ratio, **kwargs)


def test_mixture_holds_the_ratio_of_polyp_free_items_with_empty_masks():
    dataset = mixture(0.25, closeup_probability=0.5)
    assert len(dataset) == 16 and dataset.num_negatives == 4
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item["labels"].sum() > 0 for item in items[:12])
    assert all(item["labels"].sum() == 0 for item in items[12:])
    assert all(0.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0 for item in items)
    assert len(mixture(0.5)) == 24 and len(mixture(0.0)) == 12


@pytest.mark.parametrize("near_polyp_probability", [0.0, 0.5])
def test_mixture_draws_per_seed_epoch_and_index(near_polyp_probability):
    probabilities = {"own_crop_probability": 0.5, "closeup_probability": 0.5,
                     "near_polyp_probability": near_polyp_probability}
    first, second = mixture(**probabilities), mixture(**probabilities)
    first.set_epoch(3)
    second.set_epoch(3)
    for index in (0, 5, 12, 15):  # in any order, any number of times
        assert torch.equal(first[index]["pixel_values"], second[index]["pixel_values"])
    second.set_epoch(4)
    assert any(not torch.equal(first[i]["pixel_values"], second[i]["pixel_values"]) for i in range(12, 16))


def test_loss_on_an_all_empty_batch_is_finite_with_finite_gradients():
    for dice_on_empty_masks in (True, False):
        model = make_model(**TINY_OVERRIDES, dice_on_empty_masks=dice_on_empty_masks).train()
        loss = model(torch.rand(2, 3, 64, 64), labels=torch.zeros(2, 64, 64)).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dice_over_polyp_images_only_leaves_empty_masks_to_the_bce():
    attention_unet_loss = sys.modules[type(make_model(**TINY_OVERRIDES)).__module__].attention_unet_loss
    logits = torch.randn(2, 1, 16, 16)
    labels = torch.zeros(2, 1, 16, 16)
    labels[0, :, 4:10, 4:10] = 1
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    only_first = attention_unet_loss(logits[:1], labels[:1], 0.0)
    assert attention_unet_loss(logits, labels, 0.0, dice_on_empty_masks=False) == pytest.approx(only_first.item())
    assert attention_unet_loss(logits, labels, 1.0, dice_on_empty_masks=False) == pytest.approx(bce.item())
    assert attention_unet_loss(labels * 0 - 20, labels * 0, 0.0, dice_on_empty_masks=False) == 0.0


def test_negative_folder_with_an_unreadable_frame_is_named_before_step_one(small_nopolyp_dir, kvasir_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_nopolyp_dir, broken, symlinks=True)
    name = (broken / "splits" / "train.txt").read_text().split()[0]
    (broken / "images" / f"{name}.jpg").unlink()
    (broken / "images" / f"{name}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(AssertionError, match=f"{name}.jpg: cannot be decoded"):
        run_training(tmp_path / "run", kvasir_root, "--negative_dataset_name", str(broken))
    assert not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))
    assert load_negative_splits(str(small_nopolyp_dir))["validation"][0].mask is None


@pytest.fixture(scope="module")
def run_with_negatives(small_nopolyp_dir, kvasir_root, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("with_negatives")
    run_training(output_dir, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "2",
                 "--negative_dataset_name", str(small_nopolyp_dir), "--negative_ratio", "0.5",
                 "--closeup_probability", "0.3", "--near_polyp_share", "0.5")
    return output_dir


def test_training_with_negatives_logs_false_alarms_and_selects_on_both(run_with_negatives):
    records = [json.loads(line) for line in (run_with_negatives / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [8, 16]  # 16 polyp frames + 16 polyp-free items, batch 4
    for record in records:
        assert 0.0 <= record["eval_negatives_false_alarm_rate"] <= record["eval_negatives_any_pixel_rate"] <= 1.0
        # Each source's own rate (the targets hold per source); all frames together lie between them.
        by_source = [record[f"eval_negatives_{source}_false_alarm_rate"]
                     for source in ("dataset", "crops", "largest_crops")]
        assert min(by_source) <= record["eval_negatives_false_alarm_rate"] <= max(by_source)
        # Selection counts each source alike.
        expected = 0.5 * record["eval_mean_dice"] + 0.5 * (1.0 - sum(by_source) / 3)
        assert record["selection_score"] == pytest.approx(expected)
    run = json.loads((run_with_negatives / "invocations.jsonl").read_text().splitlines()[0])
    assert run["negative_ratio"] == 0.5 and run["near_polyp_share"] == 0.5
    assert run["num_eval_negatives"] >= 4 + 2 * 6  # the split, and both kinds of crops of 8 frames


def test_training_with_negatives_resumes_mid_epoch_exactly(run_with_negatives, small_nopolyp_dir, kvasir_root,
                                                           tmp_path):
    mid_epoch = run_with_negatives / "checkpoints" / "checkpoint-6"
    assert json.loads((mid_epoch / "training_state.json").read_text())["step_in_epoch"] == 6
    run_training(tmp_path, kvasir_root, "--num_train_epochs", "2", "--checkpointing_steps", "2",
                 "--negative_dataset_name", str(small_nopolyp_dir), "--negative_ratio", "0.5",
                 "--closeup_probability", "0.3", "--near_polyp_share", "0.5",
                 "--resume_from_checkpoint", str(mid_epoch))
    assert_same_weights(final_weights(tmp_path), final_weights(run_with_negatives))


@pytest.mark.parametrize("bias, flags, rate", [
    (-30.0, [], 0.0), (30.0, [], 1.0), (1.0, ["--presence_threshold", "0.9"], 0.0),
], ids=["quiet", "marks-everything", "judged-polyp-free-by-the-presence-threshold"])
def test_evaluate_reports_the_false_alarm_rate_on_polyp_free_frames(bias, flags, rate, tiny_model_dir,
                                                                     small_nopolyp_dir, kvasir_root, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = load_file(tmp_path / "model" / "model.safetensors")
    weights["segmentation_head.weight"].zero_()
    weights["segmentation_head.bias"].fill_(bias)
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    completed = subprocess.run(
        [sys.executable, "evaluate_model.py", "--model", str(tmp_path / "model"), "--dataset_name", str(kvasir_root),
         "--split", "validation", "--max_eval_samples", "6", "--resolution", "64",
         "--negative_dataset_name", str(small_nopolyp_dir), "--output_json", str(tmp_path / "result.json"), *flags],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    negatives = result["negatives"]
    assert negatives["negatives"]["num_images"] == 4
    judged_free = flags != []  # the presence threshold 0.9 is above every frame's score, sigmoid(1)
    for entry in negatives.values():
        assert entry["false_alarm_rate"] == entry["any_pixel_rate"] == (1.0 if judged_free else rate)  # raw logits
        assert entry["specificity"] == 1.0 - rate
        assert len(entry["per_image"]) == entry["num_images"]
        for frame in entry["per_image"]:
            assert frame["marked_fraction"] == (1.0 if judged_free else rate) and frame["polyp_present"] == bool(rate)
    assert all(frame["name"].endswith(" crop") for frame in negatives["own_crops"]["per_image"])
    assert all(frame["name"].endswith(" largest crop") for frame in negatives["largest_crops"]["per_image"])
    assert result["frame_sensitivity"] == rate
    if judged_free:  # no mask is left on the polyp frames either
        assert result["metrics"]["mean_recall"] == 0.0
    assert "| polyp-free frames |" in completed.stdout


def test_presence_threshold_keeps_the_asked_sensitivity_and_gating_empties_the_masks():
    from polyp_segmentation.metrics import counts_with_frames_judged_free, presence_threshold_for

    scores = torch.tensor([0.2, 0.9, 0.6, 0.95, 0.7])
    assert presence_threshold_for(scores, 1.0) == pytest.approx(0.2)
    assert presence_threshold_for(scores, 0.8) == pytest.approx(0.6)  # one of five frames may be missed
    counts = torch.tensor([[5, 1, 2, 8], [3, 0, 0, 13]])
    gated = counts_with_frames_judged_free(counts, torch.tensor([0.4, 0.9]), 0.5)
    assert gated.tolist() == [[0, 0, 7, 9], [3, 0, 0, 13]]
    assert torch.equal(counts_with_frames_judged_free(counts, torch.tensor([0.4, 0.9]), None), counts)


def test_evaluate_chooses_the_presence_threshold_on_validation_and_writes_it(tiny_model_dir, kvasir_root, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    command = [sys.executable, "evaluate_model.py", "--model", str(tmp_path / "model"), "--dataset_name", str(kvasir_root),
               "--max_eval_samples", "6", "--resolution", "64", "--choose_presence_threshold", "0.5"]
    refused = subprocess.run([*command, "--split", "test"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "validation frames only" in refused.stderr
    completed = subprocess.run([*command, "--split", "validation", "--output_json", str(tmp_path / "result.json")],
                               cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    written = json.loads((tmp_path / "model" / "config.json").read_text())["presence_threshold"]
    assert written == result["presence_threshold"] and 0.0 < written < 1.0
    assert result["frame_sensitivity"] >= 0.5
