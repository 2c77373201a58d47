"""What the tests and the benchmarks share: the repository's paths, the data folders, the tiny test architecture,
models built from the root config, and short training runs of train_accelerate.py."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
KVASIR_SEG_DIR = Path(os.environ.get("KVASIR_SEG_DIR", REPO_ROOT.parent / "shared" / "data" / "kvasir-seg"))
NOPOLYP_DIR = Path(os.environ.get("NOPOLYP_DIR", REPO_ROOT.parent / "shared" / "data" / "nopolyp"))
# A small timm encoder keeps most tests and the benchmarks' --tiny runs fast; tests marked for the default
# architecture use `convnext_tiny`.
TINY_OVERRIDES = {"encoder_name": "convnext_atto", "decoder_channels": [32, 16, 16, 8, 8]}
TINY_CONFIG_OVERRIDES = "encoder_name={},decoder_channels={}".format(
    TINY_OVERRIDES["encoder_name"], str(TINY_OVERRIDES["decoder_channels"]).replace(" ", "")
)
# The two decoders a config can build: the first version's (the v1 weights of stages 1-9) and the class defaults
# (the root config.json's, the shipped weights').
DECODER_VARIANTS = {
    "v1-transposed-conv": {"decoder_upsampling": "transposed_conv", "attention_gate_output_transform": False},
    "nearest-output-transform": {"decoder_upsampling": "nearest", "attention_gate_output_transform": True},
}


def make_config(**overrides):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True, **overrides)


def make_model(seed: int = 0, **overrides):
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(make_config(**overrides), trust_remote_code=True).eval()


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


def run_training(output_dir: Path, kvasir_root: Path, *extra: str, launcher: list[str] | None = None,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        *(launcher or [sys.executable]), str(REPO_ROOT / "train_accelerate.py"),
        "--dataset_name", str(kvasir_root), "--output_dir", str(output_dir),
        "--config_overrides", TINY_CONFIG_OVERRIDES, "--resolution", "64",
        "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--seed", "7", *extra,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return load_file(checkpoints[-1] / "model.safetensors")


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
