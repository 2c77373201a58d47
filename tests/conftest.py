"""Shared fixtures. The Kvasir-SEG copy is found through `KVASIR_SEG_DIR` (default `../shared/data/kvasir-seg` beside
the repository), the polyp-free frames through `NOPOLYP_DIR` (default `../shared/data/nopolyp`); tests that need them
skip without them, except under CI (`CI=true`), where their absence fails them."""

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
KVASIR_SEG_DIR = Path(os.environ.get("KVASIR_SEG_DIR", REPO_ROOT.parent / "shared" / "data" / "kvasir-seg"))
NOPOLYP_DIR = Path(os.environ.get("NOPOLYP_DIR", REPO_ROOT.parent / "shared" / "data" / "nopolyp"))
# A small timm encoder keeps most tests fast; tests marked for the default architecture use `convnext_tiny`.
TINY_OVERRIDES = {"encoder_name": "convnext_atto", "decoder_channels": [32, 16, 16, 8, 8]}
# The two decoders a config can build: the first version's (the v1 weights of stages 1-9) and the class defaults
# (the root config.json's, the shipped weights').
DECODER_VARIANTS = {
    "v1-transposed-conv": {"decoder_upsampling": "transposed_conv", "attention_gate_output_transform": False},
    "nearest-output-transform": {"decoder_upsampling": "nearest", "attention_gate_output_transform": True},
}

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: left out of `make test` outside CI (other transformers releases, the browser, video, the "
        "shipped model's flip-TTA evaluation); CI and `make test-all` run them"
    )


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


def make_config(**overrides):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True, **overrides)


def make_model(seed: int = 0, **overrides):
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(make_config(**overrides), trust_remote_code=True).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny model saved as a Hub repository folder (weights, config, code, processor)."""
    from transformers import AutoImageProcessor

    folder = tmp_path_factory.mktemp("tiny_model")
    make_model(**TINY_OVERRIDES).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True).save_pretrained(folder)
    return folder


def save_as_normalised_input_folder(model_dir: Path, folder: Path) -> Path:
    """Copies `model_dir` into `folder` as it was saved before the model normalised its inputs: config.json without
    `image_mean` / `image_std` (so the model takes normalised values) and a processor that normalises."""
    import json
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("configuration_attention_unet.py", "modeling_attention_unet.py", "image_processing_attention_unet.py",
                 "model.safetensors"):
        shutil.copy(model_dir / name, folder / name)
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("image_mean", "image_std"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    processor.update(do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder

