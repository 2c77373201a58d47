"""Kvasir-SEG-style data: the split rule, loading from a local folder or a Hub copy, checking every sample, and
in-memory datasets with paired image/mask augmentation."""

import io
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from image_processing_attention_unet import binarize_mask, resize_mask, to_rgb_uint8

DEFAULT_DATASET = "kowndinya23/Kvasir-SEG"  # the Hub copy: columns name / image / annotation, splits train / validation
SPLITS = ("train", "validation", "test")
IMAGE_COLUMN_CANDIDATES = ("image", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("mask", "annotation", "label", "segmentation_mask")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
SPLIT_SEED = 42


def split_official_validation(names: list[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Halves the official 120-image validation split into (validation, test), as `splits/SOURCE.md` states:
    sort, shuffle with `random.Random(seed)`, first half validation, second half test, each sorted."""
    names = sorted(names)
    random.Random(seed).shuffle(names)
    half = len(names) // 2
    return sorted(names[:half]), sorted(names[half:])


@dataclass
class RawSample:
    """An undecoded sample: `image` and `mask` are file paths, encoded bytes, or PIL images."""

    name: str
    image: Any
    mask: Any
    origin: str  # what an error message names: a file path, or `dataset[split][row]`


class DataError(ValueError):
    """The data set cannot be used as it is; the message lists every sample or column at fault."""


def _read_names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _local_split_names(root: Path) -> dict[str, list[str]]:
    splits_dir = root / "splits"
    if all((splits_dir / f"{split}.txt").is_file() for split in SPLITS):
        return {split: _read_names(splits_dir / f"{split}.txt") for split in SPLITS}
    if (splits_dir / "official_train.txt").is_file() and (splits_dir / "official_val.txt").is_file():
        validation, test = split_official_validation(_read_names(splits_dir / "official_val.txt"))
        return {"train": _read_names(splits_dir / "official_train.txt"), "validation": validation, "test": test}
    raise DataError(
        f"{splits_dir} must hold either train.txt, validation.txt and test.txt, or official_train.txt and "
        "official_val.txt (halved into validation and test by the seed-42 rule)."
    )


def _files_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: a local data set needs images/, masks/ and splits/.")
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES}


def load_local_splits(root: str | Path) -> tuple[dict[str, list[RawSample]], list[str]]:
    """Reads a folder laid out as `images/`, `masks/`, `splits/`. Returns the samples of each split and the problems
    found (an image without a mask or the reverse, a split naming a missing image)."""
    root = Path(root)
    images = _files_by_stem(root / "images")
    masks = _files_by_stem(root / "masks")
    if not images:
        raise DataError(f"{root / 'images'} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    problems = [f"{images[name]}: no mask in {root / 'masks'}" for name in sorted(images.keys() - masks.keys())]
    problems += [f"{masks[name]}: no image in {root / 'images'}" for name in sorted(masks.keys() - images.keys())]
    splits = {}
    for split, names in _local_split_names(root).items():
        samples = []
        for name in names:
            if name not in images or name not in masks:
                if name not in images and name not in masks:
                    problems.append(f"{root / 'splits' / split}.txt names {name!r}, which has no image and no mask")
                continue
            samples.append(RawSample(name, images[name], masks[name], str(images[name])))
        splits[split] = samples
    return splits, problems


def _find_column(columns: list[str], requested: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise DataError(f"{where} has no column {requested!r} for the {what}; its columns are {columns}.")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise DataError(
        f"{where} has no {what} column: looked for {list(candidates)} among {columns}. "
        f"Name it with --{'image' if what == 'image' else 'label'}_column_name."
    )


def load_hub_splits(
    dataset_name: str, image_column_name: str | None = None, label_column_name: str | None = None
) -> tuple[dict[str, list[RawSample]], list[str]]:
    """Loads a Hub copy with `datasets.load_dataset`. Its `validation` split is halved into validation and test by the
    seed-42 rule (by the `name` column where there is one), unless the copy already has a `test` split."""
    import datasets

    dataset = datasets.load_dataset(dataset_name)
    if "train" not in dataset:
        raise DataError(f"The dataset {dataset_name!r} has no 'train' split; its splits are {list(dataset)}.")
    columns = dataset["train"].column_names
    image_column = _find_column(columns, image_column_name, IMAGE_COLUMN_CANDIDATES, "image", dataset_name)
    label_column = _find_column(columns, label_column_name, LABEL_COLUMN_CANDIDATES, "mask", dataset_name)

    def samples(split: str, rows: list[int] | None = None) -> list[RawSample]:
        table = dataset[split].cast_column(image_column, datasets.Image(decode=False))
        table = table.cast_column(label_column, datasets.Image(decode=False))
        names = table["name"] if "name" in table.column_names else [f"{split}-{i:05d}" for i in range(len(table))]
        rows = range(len(table)) if rows is None else rows
        return [
            RawSample(names[i], table[i][image_column], table[i][label_column], f"{dataset_name}[{split}][{i}]")
            for i in rows
        ]

    splits = {"train": samples("train")}
    if "test" in dataset and "validation" in dataset:
        splits["validation"], splits["test"] = samples("validation"), samples("test")
    elif "validation" in dataset:
        table = dataset["validation"]
        names = table["name"] if "name" in table.column_names else [f"{i:05d}" for i in range(len(table))]
        validation, test = split_official_validation(names)
        row_of = {name: row for row, name in enumerate(names)}
        splits["validation"] = samples("validation", [row_of[name] for name in validation])
        splits["test"] = samples("validation", [row_of[name] for name in test])
    else:
        raise DataError(f"The dataset {dataset_name!r} has no 'validation' split; its splits are {list(dataset)}.")
    return splits, []


def load_splits(
    dataset_name: str, image_column_name: str | None = None, label_column_name: str | None = None
) -> tuple[dict[str, list[RawSample]], list[str]]:
    """A local folder if `dataset_name` is one, else a Hub dataset id."""
    if Path(dataset_name).is_dir():
        return load_local_splits(dataset_name)
    return load_hub_splits(dataset_name, image_column_name, label_column_name)


def _open(reference: Any) -> PIL.Image.Image:
    if isinstance(reference, PIL.Image.Image):
        return reference
    if isinstance(reference, dict):
        if reference.get("bytes"):
            return PIL.Image.open(io.BytesIO(reference["bytes"]))
        return PIL.Image.open(reference["path"])
    return PIL.Image.open(reference)


def decode_sample(sample: RawSample, resolution: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes one sample to a `(3, S, S)` uint8 image and an `(S, S)` bool mask (S = `resolution`, or the original
    size when `None`). Raises `DataError` naming the sample on any problem."""
    try:
        with _open(sample.image) as image_file, _open(sample.mask) as mask_file:
            image = to_rgb_uint8(image_file)
            mask = binarize_mask(to_rgb_uint8(mask_file))
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{sample.origin}: cannot be decoded ({error})") from error
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"{sample.origin}: image is {image.shape[1]}x{image.shape[0]} but its mask is {mask.shape[1]}x{mask.shape[0]}"
        )
    if resolution is not None:
        size = (resolution, resolution)
        image = np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.Resampling.BILINEAR))
        mask = resize_mask(mask, size)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1), torch.from_numpy(np.array(mask))


def decode_samples(
    samples: list[RawSample], resolution: int | None, num_workers: int = 2
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Decodes every sample (in threads: PIL releases the GIL). Returns names, images and masks of the good ones and
    one message per bad one."""
    def attempt(sample: RawSample):
        try:
            return decode_sample(sample, resolution)
        except DataError as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        results = list(pool.map(attempt, samples))
    names, images, masks, problems = [], [], [], []
    for sample, result in zip(samples, results):
        if isinstance(result, str):
            problems.append(result)
        else:
            names.append(sample.name)
            images.append(result[0])
            masks.append(result[1])
    return names, images, masks, problems


class MaskAlignedRandomResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop that resamples masks with NEAREST_EXACT (pixel centres, as the image's bilinear does):
    torchvision's default NEAREST shifts a magnified mask by up to half a source pixel against its image."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Mask):
            return super().transform(inpt, params)
        # `F.resized_crop` drops the interpolation for masks; `F.resize` honours NEAREST_EXACT.
        cropped = v2.functional.crop(inpt, **params)
        return v2.functional.resize(cropped, self.size, interpolation=v2.InterpolationMode.NEAREST_EXACT)


def training_augmentation(
    crop_size: int | None = None,
    scale: tuple[float, float] | None = None,
    zoom: tuple[float, float] | None = None,
) -> v2.Compose:
    """The seed recipe's augmentation: flips, rotation within +/-30 degrees, brightness/contrast/saturation +/-20 %
    (image only: v2 passes `tv_tensors.Mask` through colour transforms and resamples it with nearest-neighbour), and
    an optional random crop of side `crop_size`. With `scale`, the crop covers that range of the image's area and is
    resized to `crop_size` (as timm's RandomResizedCrop), so the model also sees polyps larger than they are. With
    `zoom`, the rotation also scales the image by a factor drawn from that range (one affine warp, so image and mask
    share one sampling grid), before the crop: polyps both smaller and larger than they are."""
    if scale is not None and crop_size is None:
        raise ValueError("A scale range needs the crop_size the crops are resized to.")
    if scale is not None and zoom is not None:
        raise ValueError("Pass a scale range (resized crops) or a zoom range (affine zoom), not both.")
    transforms = []
    if scale is not None:
        transforms.append(MaskAlignedRandomResizedCrop(crop_size, scale=scale, antialias=True))
    transforms += [
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(degrees=30) if zoom is None else v2.RandomAffine(degrees=30, scale=zoom),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
    ]
    if crop_size is not None and scale is None:
        transforms.append(v2.RandomCrop(crop_size))
    return v2.Compose(transforms)


class PolypSegmentationDataset(torch.utils.data.Dataset):
    """Decoded images and masks kept in memory as uint8, normalised (and augmented, if `augmentation` is given) on
    access. Each item's augmentation is drawn from its own generator seeded by (seed, epoch, index), so a resumed run
    sees exactly the augmentations the interrupted one would have.

    With `augment_on_access=False`, items are the raw uint8 `image`, `mask` and `index`, and `prepare_batch`
    augments a collated batch on the training device instead: the same draws per (seed, epoch, index), but the warps
    run where a GPU does them in microseconds, instead of in CPU workers that cannot keep up with it."""

    def __init__(
        self,
        names: list[str],
        images: list[torch.Tensor],
        masks: list[torch.Tensor],
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        augmentation: v2.Transform | None = None,
        seed: int = 0,
        augment_on_access: bool = True,
    ):
        self.names = names
        self.images = images
        self.masks = masks
        self.mean = torch.tensor(image_mean).view(-1, 1, 1)
        self.std = torch.tensor(image_std).view(-1, 1, 1)
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        self.augment_on_access = augment_on_access or augmentation is None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not self.augment_on_access:
            return {"image": self.images[index], "mask": self.masks[index].to(torch.uint8), "index": index}
        return self.prepare(self.images[index], self.masks[index], index)

    def prepare(self, image: torch.Tensor, mask: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """`(3, H, W)` uint8 image and `(H, W)` mask, on any device -> normalised `pixel_values` and float `labels`,
        augmented with sample `index`'s draw of this epoch."""
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask[None].to(torch.uint8))
        if self.augmentation is not None:
            with torch.random.fork_rng(devices=[]):  # the parameters are drawn on the CPU, wherever the data is
                torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
                image, mask = self.augmentation(image, mask)
        mean, std = self.mean.to(image.device), self.std.to(image.device)
        pixel_values = (image.as_subclass(torch.Tensor).float() / 255.0 - mean) / std
        return {"pixel_values": pixel_values, "labels": mask.as_subclass(torch.Tensor)[0].float()}

    def prepare_batch(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        """A collated batch of raw items (`augment_on_access=False`) -> the batch `__getitem__` would have given,
        augmented on `device`, one draw per sample."""
        items = [self.prepare(image.to(device, non_blocking=True), mask.to(device, non_blocking=True), int(index))
                 for image, mask, index in zip(batch["image"], batch["mask"], batch["index"])]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
