"""The data pipeline: the split rule, local folders, mask encodings, and augmentation that keeps image and mask
aligned, is drawn per (seed, epoch, index) and gives the same batches on the training device."""

import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyp_segmentation.data import (
    PolypSegmentationDataset,
    binarize_mask,
    load_local_splits,
    split_official_validation,
    training_augmentation,
)


def test_split_rule_reproduces_the_shared_splits(kvasir_root):
    splits = kvasir_root / "splits"
    validation, test = split_official_validation((splits / "official_val.txt").read_text().split())
    assert validation == (splits / "validation.txt").read_text().split()
    assert test == (splits / "test.txt").read_text().split()
    assert len(validation) == len(test) == 60 and not set(validation) & set(test)


def test_local_folder_without_derived_split_files_uses_the_rule(kvasir_root, tmp_path):
    (tmp_path / "splits").mkdir()
    for name in ("images", "masks"):
        (tmp_path / name).symlink_to(kvasir_root / name)
    for name in ("official_train.txt", "official_val.txt"):
        shutil.copy(kvasir_root / "splits" / name, tmp_path / "splits" / name)
    derived, problems = load_local_splits(tmp_path)
    shared, _ = load_local_splits(kvasir_root)
    assert not problems
    assert {split: len(samples) for split, samples in derived.items()} == {"train": 880, "validation": 60, "test": 60}
    for split in derived:
        assert sorted(s.name for s in derived[split]) == sorted(s.name for s in shared[split])


def drawn_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """A `(3, 96, 96)` image whose bright pixels are exactly its `(96, 96)` mask."""
    mask = torch.zeros(96, 96, dtype=torch.bool)
    mask[20:50, 30:80] = True
    mask[60:90, 10:25] = True
    return torch.where(mask, 230, 20).to(torch.uint8).expand(3, -1, -1).clone(), mask


@pytest.mark.parametrize(
    "augmentation_kwargs",
    [{}, {"crop_size": 64}, {"crop_size": 96, "scale": (0.3, 1.0)}, {"crop_size": 80, "scale": (0.3, 0.6)},
     {"zoom": (0.5, 2.0)}, {"crop_size": 64, "zoom": (0.75, 1.33)}, {"crop_size": 64, "strong": True}],
    ids=["whole", "crop", "scale", "scaled-crop", "zoom", "zoomed-crop", "strong"],
)
def test_augmentation_keeps_image_and_mask_aligned(augmentation_kwargs):
    """A mask drawn into the image must still coincide with the mask after crops, flips, rotation and jitter."""
    image, mask = drawn_sample()
    augmentation = training_augmentation(**augmentation_kwargs)
    dataset = PolypSegmentationDataset(["drawn"], [image], [mask], (0, 0, 0), (1, 1, 1), augmentation, seed=1)
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        drawn = item["pixel_values"].mean(0) > 0.5
        labels = item["labels"].bool()
        assert set(item["labels"].unique().tolist()) <= {0.0, 1.0}
        assert labels.shape == (augmentation_kwargs.get("crop_size", 96),) * 2
        if not labels.any():
            continue  # a crop may miss both objects; what it shows must still agree
        iou = (drawn & labels).sum() / (drawn | labels).sum()
        assert iou > 0.95, f"epoch {epoch}: image and mask drifted apart (IoU {iou:.3f})"


def test_scale_augmentation_enlarges_objects_and_needs_an_output_size():
    """Crops covering 30-50 % of the area, resized back to the full side, magnify what they show."""
    image, mask = drawn_sample()
    dataset = PolypSegmentationDataset(
        ["drawn"], [image], [mask], (0, 0, 0), (1, 1, 1), training_augmentation(96, scale=(0.3, 0.5)), seed=2
    )
    areas = []
    for epoch in range(16):
        dataset.set_epoch(epoch)
        areas.append(dataset[0]["labels"].sum().item())
    # Flips and rotation keep the drawn area (or clip it); only magnification can grow it by half.
    assert max(areas) > 1.5 * mask.sum().item(), areas
    with pytest.raises(ValueError, match="crop_size"):
        training_augmentation(scale=(0.5, 1.0))


def test_zoom_jitter_both_shrinks_and_enlarges_objects():
    image, mask = drawn_sample()
    dataset = PolypSegmentationDataset(
        ["drawn"], [image], [mask], (0, 0, 0), (1, 1, 1), training_augmentation(zoom=(0.6, 1.6)), seed=3
    )
    areas = []
    for epoch in range(24):
        dataset.set_epoch(epoch)
        areas.append(dataset[0]["labels"].sum().item())
    drawn = mask.sum().item()
    assert min(areas) < 0.6 * drawn and max(areas) > 1.4 * drawn, areas
    with pytest.raises(ValueError, match="not both"):
        training_augmentation(64, scale=(0.5, 1.0), zoom=(0.8, 1.2))


def test_augmentation_is_reproducible_per_seed_epoch_and_index():
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    mask = torch.rand(32, 32) > 0.5
    dataset = PolypSegmentationDataset(["x"], [image], [mask], (0, 0, 0), (1, 1, 1), training_augmentation(), seed=3)
    first = dataset[0]["pixel_values"]
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(dataset[0]["pixel_values"], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["pixel_values"], first)


@settings(max_examples=20, deadline=None)
@given(height=st.integers(24, 90), width=st.integers(24, 90), batch=st.integers(1, 4), seed=st.integers(0, 10**6),
       epoch=st.integers(0, 50), crop=st.sampled_from([None, 16, 24]))
def test_augmenting_batches_on_the_device_draws_what_the_workers_draw(height, width, batch, seed, epoch, crop):
    """`prepare_batch` (the training device's path) gives exactly the items `__getitem__` (the DataLoader workers')
    gives, for any sizes and draws, and so keeps masks aligned wherever the workers' path does."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator) for _ in range(batch)]
    masks = [torch.rand(height, width, generator=generator) > 0.6 for _ in range(batch)]
    augmentation = training_augmentation(crop, zoom=(0.75, 1.33))
    arguments = ([str(i) for i in range(batch)], images, masks, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), augmentation, seed)
    on_access, on_device = PolypSegmentationDataset(*arguments), PolypSegmentationDataset(*arguments, False)
    for dataset in (on_access, on_device):
        dataset.set_epoch(epoch)
    raw = torch.utils.data.default_collate([on_device[i] for i in range(batch)])
    assert raw["image"].dtype == torch.uint8 and "pixel_values" not in raw
    augmented = on_device.prepare_batch(raw, "cpu")
    for index in range(batch):
        expected = on_access[index]
        assert torch.equal(augmented["pixel_values"][index], expected["pixel_values"])
        assert torch.equal(augmented["labels"][index], expected["labels"])


@settings(max_examples=15, deadline=None)
@given(height=st.integers(32, 96), width=st.integers(32, 96), seed=st.integers(0, 10**6),
       crop=st.sampled_from([None, 24]), boxes=st.lists(st.tuples(st.floats(0, 0.6), st.floats(0, 0.6),
                                                                   st.floats(0.25, 0.4), st.floats(0.25, 0.4)),
                                                         min_size=1, max_size=3))
def test_augmenting_on_the_device_keeps_masks_aligned_for_any_shape(height, width, seed, crop, boxes):
    mask = torch.zeros(height, width, dtype=torch.bool)
    for top, left, box_height, box_width in boxes:
        rows = slice(int(top * height), int((top + box_height) * height))
        mask[rows, int(left * width):int((left + box_width) * width)] = True
    image = torch.where(mask, 230, 20).to(torch.uint8).expand(3, -1, -1).clone()
    dataset = PolypSegmentationDataset(["drawn"], [image], [mask], (0, 0, 0), (1, 1, 1),
                                       training_augmentation(crop, zoom=(0.75, 1.33)), seed, augment_on_access=False)
    item = dataset.prepare_batch(torch.utils.data.default_collate([dataset[0]]), "cpu")
    drawn, labels = item["pixel_values"][0].mean(0) > 0.5, item["labels"][0].bool()
    if labels.sum() > 20:  # a crop may show next to nothing; what it shows must agree
        assert (drawn & labels).sum() / (drawn | labels).sum() > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmenting_on_cuda_draws_what_the_cpu_draws():
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8, generator=generator) for _ in range(4)]
    masks = [torch.rand(80, 96, generator=generator) > 0.6 for _ in range(4)]
    dataset = PolypSegmentationDataset(list("abcd"), images, masks, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2),
                                       training_augmentation(64, zoom=(0.75, 1.33)), 5, augment_on_access=False)
    raw = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    on_cpu, on_cuda = dataset.prepare_batch(raw, "cpu"), dataset.prepare_batch(raw, "cuda")
    torch.testing.assert_close(on_cuda["pixel_values"].cpu(), on_cpu["pixel_values"], atol=0.05, rtol=0)
    assert (on_cuda["labels"].cpu() != on_cpu["labels"]).float().mean() < 0.01


@pytest.mark.parametrize(
    "encoding",
    ["zero_one", "zero_255", "rgb", "jpeg_noise"],
)
def test_mask_encodings_are_read_as_binary(encoding):
    truth = np.zeros((8, 8), dtype=bool)
    truth[2:6, 3:7] = True
    mask = {
        "zero_one": truth.astype(np.uint8),
        "zero_255": truth.astype(np.uint8) * 255,
        "rgb": np.repeat((truth.astype(np.uint8) * 255)[..., None], 3, axis=-1),
        "jpeg_noise": np.where(truth, 250, 6).astype(np.uint8),
    }[encoding]
    np.testing.assert_array_equal(binarize_mask(mask), truth)

