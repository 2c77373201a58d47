"""Shared fixtures. The Kvasir-SEG copy is found through `KVASIR_SEG_DIR` (default `../shared/data/kvasir-seg` beside
the repository), the polyp-free frames through `NOPOLYP_DIR` (default `../shared/data/nopolyp`); tests that need them
skip without them, except under CI (`CI=true`), where their absence fails them."""

import os
from pathlib import Path

import pytest

from polyp_segmentation.testing import KVASIR_SEG_DIR, NOPOLYP_DIR, REPO_ROOT, TINY_OVERRIDES, make_model


def _data_folder(folder: Path, what: str, variable: str) -> Path:
    if not (folder / "images").is_dir():
        message = f"{what} not found at {folder} (set {variable})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must have it.")
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def kvasir_root() -> Path:
    return _data_folder(KVASIR_SEG_DIR, "Kvasir-SEG", "KVASIR_SEG_DIR")


@pytest.fixture(scope="session")
def nopolyp_root() -> Path:
    return _data_folder(NOPOLYP_DIR, "The polyp-free frames", "NOPOLYP_DIR")


@pytest.fixture(scope="session")
def small_nopolyp_dir(nopolyp_root, tmp_path_factory) -> Path:
    """Eight training and four validation frames of the polyp-free set, laid out like it."""
    folder = tmp_path_factory.mktemp("nopolyp_small")
    (folder / "images").mkdir()
    (folder / "splits").mkdir()
    for split, count in (("train", 8), ("validation", 4)):
        names = (nopolyp_root / "splits" / f"{split}.txt").read_text().split()[:count]
        for name in names:
            (folder / "images" / f"{name}.jpg").symlink_to(nopolyp_root / "images" / f"{name}.jpg")
        (folder / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return folder


@pytest.fixture(scope="session")
def test_split_names(kvasir_root) -> list[str]:
    return (kvasir_root / "splits" / "test.txt").read_text().split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model saved as a Hub repository folder (weights, config, code, processor)."""
    from transformers import AutoImageProcessor

    folder = tmp_path_factory.mktemp("tiny_model")
    make_model(**TINY_OVERRIDES).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True).save_pretrained(folder)
    return folder

