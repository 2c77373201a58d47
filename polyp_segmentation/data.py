"""Kvasir-SEG-style data: the split rule, loading from a local folder or a Hub copy, checking every sample, and
in-memory datasets with paired image/mask augmentation."""

import io
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from image_processing_attention_unet import binarize_mask, resize_mask, to_rgb_uint8

DEFAULT_DATASET = "kowndinya23/Kvasir-SEG"  # the Hub copy: columns name / image / annotation, splits train / validation
SPLITS = ("train", "validation", "test")
IMAGE_COLUMN_CANDIDATES = ("image", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("mask", "annotation", "label", "segmentation_mask")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
SPLIT_SEED = 42
NEGATIVE_SPLITS = ("train", "validation")
SOURCE_STREAM = 1  # tells `PolypMixtureDataset`'s draw of what an item shows from its augmentation's draw


def split_official_validation(names: list[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Halves the official 120-image validation split into (validation, test), as `splits/SOURCE.md` states:
    sort, shuffle with `random.Random(seed)`, first half validation, second half test, each sorted."""
    names = sorted(names)
    random.Random(seed).shuffle(names)
    half = len(names) // 2
    return sorted(names[:half]), sorted(names[half:])


@dataclass
class RawSample:
    """An undecoded sample: `image` and `mask` are file paths, encoded bytes, or PIL images; `mask` is `None` for a
    polyp-free frame (an empty mask)."""

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


def load_negative_splits(dataset_name: str, image_column_name: str | None = None) -> dict[str, list[RawSample]]:
    """Polyp-free frames, whose masks are all empty (so none are stored): a local folder with `images/` and
    `splits/train.txt`, `splits/validation.txt`, or a Hub dataset with `train` and `validation` splits of images.
    Raises `DataError` naming what is missing."""
    if Path(dataset_name).is_dir():
        root = Path(dataset_name)
        images = _files_by_stem(root / "images")
        splits, problems = {}, []
        for split in NEGATIVE_SPLITS:
            path = root / "splits" / f"{split}.txt"
            if not path.is_file():
                raise DataError(f"{path} is missing: a folder of polyp-free frames needs images/ and "
                                f"splits/{'.txt, splits/'.join(NEGATIVE_SPLITS)}.txt.")
            names = _read_names(path)
            problems += [f"{path} names {name!r}, which has no image in {root / 'images'}"
                         for name in names if name not in images]
            splits[split] = [RawSample(name, images[name], None, str(images[name])) for name in names if name in images]
        if problems:
            raise DataError(f"{len(problems)} problem(s) in {root}:\n  " + "\n  ".join(problems))
        return splits
    import datasets

    dataset = datasets.load_dataset(dataset_name)
    missing = [split for split in NEGATIVE_SPLITS if split not in dataset]
    if missing:
        raise DataError(f"The dataset {dataset_name!r} has no {missing} split(s); its splits are {list(dataset)}.")
    column = _find_column(dataset["train"].column_names, image_column_name, IMAGE_COLUMN_CANDIDATES, "image",
                          dataset_name)
    splits = {}
    for split in NEGATIVE_SPLITS:
        table = dataset[split].cast_column(column, datasets.Image(decode=False))
        splits[split] = [RawSample(f"{split}-{row:05d}", table[row][column], None, f"{dataset_name}[{split}][{row}]")
                         for row in range(len(table))]
    return splits


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
        with _open(sample.image) as image_file:
            image = to_rgb_uint8(image_file)
        if sample.mask is None:  # a polyp-free frame
            mask = np.zeros(image.shape[:2], dtype=bool)
        else:
            with _open(sample.mask) as mask_file:
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


def processor_normalization(processor) -> tuple[list[float] | None, list[float] | None]:
    """The `(image_mean, image_std)` a dataset must apply to give `pixel_values` as `processor` makes them: the
    processor's statistics where it normalises (models saved before they normalised their inputs), else `(None,
    None)`: values in [0, 1], which the model normalises."""
    if processor.do_normalize:
        return processor.image_mean, processor.image_std
    return None, None


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
    strong: bool = False,
) -> v2.Compose:
    """The seed recipe's augmentation: flips, rotation within +/-30 degrees, brightness/contrast/saturation +/-20 %
    (image only: v2 passes `tv_tensors.Mask` through colour transforms and resamples it with nearest-neighbour), and
    an optional random crop of side `crop_size`. With `scale`, the crop covers that range of the image's area and is
    resized to `crop_size` (as timm's RandomResizedCrop), so the model also sees polyps larger than they are. With
    `zoom`, the rotation also scales the image by a factor drawn from that range (one affine warp, so image and mask
    share one sampling grid), before the crop: polyps both smaller and larger than they are. `strong` is the
    augmentation of the best published from-scratch Kvasir-SEG recipe (DUCK-Net): rotation within +/-180 degrees,
    translation within +/-12.5 %, shear within +/-22.5 degrees and zoom `zoom` (default 0.5-1.5) in one warp, and
    brightness 0.6-1.6."""
    if scale is not None and crop_size is None:
        raise ValueError("A scale range needs the crop_size the crops are resized to.")
    if scale is not None and zoom is not None:
        raise ValueError("Pass a scale range (resized crops) or a zoom range (affine zoom), not both.")
    transforms = []
    if scale is not None:
        transforms.append(MaskAlignedRandomResizedCrop(crop_size, scale=scale, antialias=True))
    if strong:
        warp = v2.RandomAffine(degrees=180, translate=(0.125, 0.125), scale=zoom or (0.5, 1.5), shear=22.5)
        colour = v2.ColorJitter(brightness=(0.6, 1.6), contrast=0.2, saturation=0.2)
    else:
        warp = v2.RandomRotation(degrees=30) if zoom is None else v2.RandomAffine(degrees=30, scale=zoom)
        colour = v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)
    transforms += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), warp, colour]
    if crop_size is not None and scale is None:
        transforms.append(v2.RandomCrop(crop_size))
    return v2.Compose(transforms)


def _uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high], drawn from `generator`."""
    return low + int(torch.randint(high - low + 1, (1,), generator=generator))


def polyp_free_box(mask: torch.Tensor, generator: torch.Generator, side_range: tuple[float, float] = (0.25, 0.6),
                   margin: float = 0.04, attempts: int = 64) -> tuple[int, int, int] | None:
    """A square `(top, left, side)` of a frame whose `(H, W)` mask it keeps clear of by `margin` of the frame's shorter
    side, its side a `side_range` fraction of that side (border and on-screen text may fall inside: the cue must be
    the polyp, not the frame's layout). `None` when `attempts` random squares all touch the polyp."""
    height, width = mask.shape
    shorter = min(height, width)
    pad = max(1, round(margin * shorter))
    near_polyp = F.max_pool2d(mask[None, None].float(), 2 * pad + 1, stride=1, padding=pad)[0, 0] > 0
    # Summed-area table: the marked pixels inside any box in four look-ups.
    table = F.pad(near_polyp.long().cumsum(0).cumsum(1), (1, 0, 1, 0))
    low, high = (max(1, round(fraction * shorter)) for fraction in side_range)
    for _ in range(attempts):
        side = _uniform_int(low, high, generator)
        top, left = _uniform_int(0, height - side, generator), _uniform_int(0, width - side, generator)
        bottom, right = top + side, left + side
        if table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left] == 0:
            return top, left, side
    return None


def _clear_squares(image: torch.Tensor, mask: torch.Tensor, margin: float,
                   dark_level: int) -> Callable[[int], torch.Tensor]:
    """For a `(3, H, W)` uint8 frame and its `(H, W)` mask: a function of `side` giving, for each top-left corner,
    whether the square there keeps `margin` of the shorter side away from the polyp and from every dark pixel (below
    `dark_level` in all channels)."""
    pad = max(1, round(margin * min(mask.shape)))
    dark = image.max(dim=0).values < dark_level
    keep_out = F.max_pool2d((mask | dark)[None, None].float(), 2 * pad + 1, stride=1, padding=pad)[0, 0] > 0
    table = F.pad(keep_out.long().cumsum(0).cumsum(1), (1, 0, 1, 0))

    def clear_squares(side: int) -> torch.Tensor:
        """`(H - side + 1, W - side + 1)`: whether the square of `side` at each top-left corner is clear."""
        return (table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]) == 0

    return clear_squares


def _largest_clear_side(clear_squares: Callable[[int], torch.Tensor], low: int, high: int) -> int | None:
    """The largest side in `[low, high]` with a clear square, or `None`."""
    if not clear_squares(low).any():
        return None
    while low < high:  # a clear square of some side holds clear squares of every smaller side
        middle = (low + high + 1) // 2
        low, high = (middle, high) if clear_squares(middle).any() else (low, middle - 1)
    return low


def largest_polyp_free_box(image: torch.Tensor, mask: torch.Tensor, margin: float = 0.04, dark_level: int = 30,
                           smallest_side: float = 0.25) -> tuple[int, int, int] | None:
    """The largest square `(top, left, side)` of a `(3, H, W)` uint8 frame that keeps `margin` of its shorter side
    away from the polyp of its `(H, W)` mask and from every dark pixel (below `dark_level` in all channels: the black
    border and the on-screen text's box, and a dark lumen too; text printed over the mucosa is not caught); the first
    in row-major order among equals. `None` when no such square has `smallest_side` of the shorter side. Stricter
    than `polyp_free_box`: no border, and as much mucosa as the frame has."""
    shorter = min(mask.shape)
    clear_squares = _clear_squares(image, mask, margin, dark_level)
    side = _largest_clear_side(clear_squares, max(1, round(smallest_side * shorter)), shorter)
    if side is None:
        return None
    top, left = (int(i) for i in clear_squares(side).nonzero()[0])
    return top, left, side


def near_polyp_free_box(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, margin: float = 0.04,
                        dark_level: int = 30, smallest_side: float = 0.25) -> tuple[int, int, int] | None:
    """A square `(top, left, side)` as `largest_polyp_free_box` keeps clear, of a random side up to the largest, the
    one of that side whose centre lies nearest the polyp's centre: the mucosa just past the polyp's margin, where a
    model trained on whole polyps marks most. `None` for an empty mask or where no clear square has `smallest_side`
    of the shorter side."""
    if not mask.any():
        return None
    shorter = min(mask.shape)
    clear_squares = _clear_squares(image, mask, margin, dark_level)
    low = max(1, round(smallest_side * shorter))
    largest = _largest_clear_side(clear_squares, low, shorter)
    if largest is None:
        return None
    side = _uniform_int(low, largest, generator)
    corners = clear_squares(side).nonzero().float()
    centre = mask.nonzero().float().mean(dim=0) - (side - 1) / 2  # the corner whose square is centred on the polyp
    top, left = (int(i) for i in corners[(corners - centre).square().sum(dim=1).argmin()])
    return top, left, side


def polyp_closeup_box(mask: torch.Tensor, generator: torch.Generator,
                      largest_side: float = 0.6) -> tuple[int, int, int] | None:
    """A square `(top, left, side)` around the whole polyp of an `(H, W)` mask, at most `largest_side` of the frame's
    shorter side where the polyp fits (else just large enough for it, or centred on it where it is longer than the
    frame's shorter side): a close-up that still holds the polyp, so that "close-up" cannot become the cue for "no
    polyp". `None` for an empty mask."""
    rows, columns = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    if len(rows) == 0:
        return None
    height, width = mask.shape
    top_row, bottom_row, left_column, right_column = int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])
    needed = min(max(bottom_row - top_row, right_column - left_column) + 1, height, width)
    side = _uniform_int(needed, max(needed, round(largest_side * min(height, width))), generator)

    def start(first: int, last: int, limit: int) -> int:
        low, high = max(0, last + 1 - side), min(first, limit - side)
        if low > high:  # the polyp is longer than the square can be on this axis: centre the square on it
            return min(max((first + last + 1 - side) // 2, 0), limit - side)
        return _uniform_int(low, high, generator)

    return start(top_row, bottom_row, height), start(left_column, right_column, width), side


def crop_resized(image: torch.Tensor, mask: torch.Tensor,
                 box: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(top, left, side)` square of a `(3, H, W)` uint8 image and its `(H, W)` bool mask, resized back to
    `(H, W)`: the image bilinearly, the mask at pixel centres (as `MaskAlignedRandomResizedCrop`)."""
    top, left, side = box
    size = list(image.shape[-2:])
    image = v2.functional.resized_crop(image, top, left, side, side, size, antialias=True)
    mask = v2.functional.crop(mask[None].to(torch.uint8), top, left, side, side)
    mask = v2.functional.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)[0].bool()
    return image, mask


def _fixed_crops(names: list[str], images: list[torch.Tensor], masks: list[torch.Tensor],
                 box_of: Callable[[int, torch.Tensor, torch.Tensor], tuple[int, int, int] | None],
                 suffix: str) -> tuple[list[str], list[torch.Tensor]]:
    """The crop `box_of(index, image, mask)` of each frame that has one (not `None`), named `"<frame> <suffix>"`."""
    crop_names, crops = [], []
    for index, (name, image, mask) in enumerate(zip(names, images, masks)):
        box = box_of(index, image, mask)
        if box is not None:
            crop_names.append(f"{name} {suffix}")
            crops.append(crop_resized(image, mask, box)[0])
    return crop_names, crops


def polyp_free_crops(names: list[str], images: list[torch.Tensor], masks: list[torch.Tensor],
                     seed: int = SPLIT_SEED) -> tuple[list[str], list[torch.Tensor]]:
    """One polyp-free crop (see `polyp_free_box`) of each frame that has room for one, drawn from `seed` and the
    frame's position: fixed negatives for validation. Returns the crops' names (`"<frame> crop"`) and the crops."""
    return _fixed_crops(names, images, masks, lambda index, image, mask: polyp_free_box(
        mask, torch.Generator().manual_seed(hash((seed, index)) % 2**63)), "crop")


def largest_polyp_free_crops(names: list[str], images: list[torch.Tensor],
                             masks: list[torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """The `largest_polyp_free_box` crop of each frame that has room for one: fixed negatives for evaluation.
    Returns the crops' names (`"<frame> largest crop"`) and the crops."""
    return _fixed_crops(names, images, masks, lambda index, image, mask: largest_polyp_free_box(image, mask),
                        "largest crop")


class PolypSegmentationDataset(torch.utils.data.Dataset):
    """Decoded images and masks kept in memory as uint8, rescaled to [0, 1] (and augmented, if `augmentation` is given)
    on access; normalised too where `image_mean` and `image_std` are given (for models that take normalised input,
    see `processor_normalization`). Each item's augmentation is drawn from its own generator seeded by (seed, epoch,
    index), so a resumed run sees exactly the augmentations the interrupted one would have.

    With `augment_on_access=False`, items are the raw uint8 `image`, `mask` and `index`, and `prepare_batch`
    augments a collated batch on the training device instead: the same draws per (seed, epoch, index), but the warps
    run where a GPU does them in microseconds, instead of in CPU workers that cannot keep up with it."""

    def __init__(
        self,
        names: list[str],
        images: list[torch.Tensor],
        masks: list[torch.Tensor],
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        augmentation: v2.Transform | None = None,
        seed: int = 0,
        augment_on_access: bool = True,
    ):
        self.names = names
        self.images = images
        self.masks = masks
        self.mean = None if image_mean is None else torch.tensor(image_mean).view(-1, 1, 1)
        self.std = None if image_std is None else torch.tensor(image_std).view(-1, 1, 1)
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        self.augment_on_access = augment_on_access or augmentation is None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def source(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item `index`'s `(3, H, W)` uint8 image and `(H, W)` bool mask, before augmentation."""
        return self.images[index], self.masks[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self.source(index)
        if not self.augment_on_access:
            return {"image": image, "mask": mask.to(torch.uint8), "index": index}
        return self.prepare(image, mask, index)

    def prepare(self, image: torch.Tensor, mask: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        """`(3, H, W)` uint8 image and `(H, W)` mask, on any device -> `pixel_values` (in [0, 1], or normalised) and
        float `labels`, augmented with sample `index`'s draw of this epoch."""
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask[None].to(torch.uint8))
        if self.augmentation is not None:
            with torch.random.fork_rng(devices=[]):  # the parameters are drawn on the CPU, wherever the data is
                torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
                image, mask = self.augmentation(image, mask)
        pixel_values = image.as_subclass(torch.Tensor).float() / 255.0
        if self.mean is not None:
            pixel_values = (pixel_values - self.mean.to(image.device)) / self.std.to(image.device)
        return {"pixel_values": pixel_values, "labels": mask.as_subclass(torch.Tensor)[0].float()}

    def prepare_batch(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        """A collated batch of raw items (`augment_on_access=False`) -> the batch `__getitem__` would have given,
        augmented on `device`, one draw per sample."""
        items = [self.prepare(image.to(device, non_blocking=True), mask.to(device, non_blocking=True), int(index))
                 for image, mask, index in zip(batch["image"], batch["mask"], batch["index"])]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class PolypMixtureDataset(PolypSegmentationDataset):
    """Training data with polyp-free items mixed in. Items `0 .. len(images) - 1` are the polyp frames; the
    `num_negatives` after them are polyp-free, each drawn anew every epoch from (seed, epoch, index): with
    probability `own_crop_probability` a polyp-free crop of a random polyp frame (`polyp_free_box`; with
    `near_polyp_probability`, the square just past its polyp's margin instead, `near_polyp_free_box`), else a random
    frame of `negative_images`. With `closeup_probability`, a polyp item is a close-up around its polyp
    (`polyp_closeup_box`) instead of the whole frame. Then every item is augmented as in `PolypSegmentationDataset`,
    so a shuffled epoch holds `negative_ratio` polyp-free items, and a resumed run draws exactly what the interrupted
    one would have."""

    def __init__(self, names: list[str], images: list[torch.Tensor], masks: list[torch.Tensor],
                 negative_images: list[torch.Tensor], negative_ratio: float, own_crop_probability: float = 0.5,
                 closeup_probability: float = 0.0, near_polyp_probability: float = 0.0, **kwargs):
        super().__init__(names, images, masks, **kwargs)
        if not 0.0 <= negative_ratio < 1.0:
            raise ValueError(f"negative_ratio must lie in [0, 1), got {negative_ratio}.")
        if negative_ratio > 0 and not negative_images and own_crop_probability < 1.0:
            raise ValueError("negative_ratio > 0 with no polyp-free frames: give some, or own_crop_probability 1.")
        self.negative_images = negative_images
        self.num_negatives = round(len(images) * negative_ratio / (1.0 - negative_ratio))
        self.own_crop_probability = own_crop_probability
        self.closeup_probability = closeup_probability
        self.near_polyp_probability = near_polyp_probability

    def __len__(self) -> int:
        return len(self.images) + self.num_negatives

    def source(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A stream of its own, apart from the augmentation's (seed, epoch, index) draw; integers only, as the hash of a
        # string changes from one process to the next.
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, SOURCE_STREAM)) % 2**63)
        if index < len(self.images):
            image, mask = self.images[index], self.masks[index]
            if float(torch.rand((), generator=generator)) < self.closeup_probability:
                box = polyp_closeup_box(mask, generator)
                if box is not None:
                    image, mask = crop_resized(image, mask, box)
            return image, mask
        if not self.negative_images or float(torch.rand((), generator=generator)) < self.own_crop_probability:
            # Drawn only when asked for, so that runs without near-polyp crops keep their draws.
            near = self.near_polyp_probability > 0 and float(torch.rand((), generator=generator)) < (
                self.near_polyp_probability)
            # Frames with no room away from their polyp are passed over for the next one.
            start = _uniform_int(0, len(self.images) - 1, generator)
            for offset in range(len(self.images)):
                other = (start + offset) % len(self.images)
                image, mask = self.images[other], self.masks[other]
                box = near_polyp_free_box(image, mask, generator) if near else polyp_free_box(mask, generator)
                if box is not None:
                    return crop_resized(image, mask, box)
            raise DataError("No polyp frame has room for a polyp-free crop.")
        image = self.negative_images[_uniform_int(0, len(self.negative_images) - 1, generator)]
        return image, torch.zeros(image.shape[-2:], dtype=torch.bool)

