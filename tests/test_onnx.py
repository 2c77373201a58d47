"""export_onnx.py on the tiny model: ONNX Runtime matches PyTorch at several sizes and batch sizes, and predict.py
gives the same masks through either."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from polyp_segmentation.testing import REPO_ROOT

ATOL = 1e-3


def run_script(*args) -> subprocess.CompletedProcess:
    # One thread: the tiny model gains nothing from more, and OpenMP threads slow down badly on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def frames(kvasir_root):
    return sorted((kvasir_root / "images").glob("*.jpg"))[:3]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, frames, tmp_path_factory):
    """The tiny model with non-trivial BatchNorm statistics and its head rescaled so that the logits on real frames
    have mean 0 and std 3: a fresh head's are ~1e-3, which would make a 1e-3 tolerance meaningless and the masks
    constant."""
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir, trust_remote_code=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        pixel_values = processor(images=[PIL.Image.open(frame) for frame in frames], return_tensors="pt")
        logits = model(**pixel_values).logits
        scale = 3.0 / logits.std()
        head = model.segmentation_head
        head.weight.mul_(scale)
        head.bias.copy_((head.bias - logits.mean()) * scale)
    folder = tmp_path_factory.mktemp("tiny_scaled")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def export(model_dir, frames, tmp_path_factory):
    onnx_path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = run_script("export_onnx.py", "--model", model_dir, "--output", onnx_path,
                        "--check_images", *frames[:2])
    assert result.returncode == 0, result.stdout + result.stderr
    return onnx_path, result


def test_export_checks_itself_against_pytorch(export):
    onnx_path, result = export
    match = re.search(r"max abs logit difference: (\S+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) < ATOL
    assert "OK" in result.stdout


@pytest.mark.parametrize("size", [(256, 256), (203, 297)], ids=["256x256", "203x297"])
def test_parity_over_sizes_and_batch_sizes(export, model_dir, frames, size):
    import onnxruntime as ort
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    session = ort.InferenceSession(str(export[0]), providers=["CPUExecutionProvider"])
    images = [PIL.Image.open(frame) for frame in frames]
    pixel_values = processor(images=images, size={"height": size[0], "width": size[1]},
                             return_tensors="pt")["pixel_values"]
    for batch in (1, 3):
        inputs = pixel_values[:batch]
        with torch.no_grad():
            expected = model(pixel_values=inputs, output_attentions=True)
        logits, *attentions = session.run(None, {"pixel_values": inputs.numpy()})
        assert logits.shape == (batch, 1, *size)
        assert expected.logits.std() > 0.5  # a real test of the tolerance
        assert np.abs(logits - expected.logits.numpy()).max() < ATOL
        assert len(attentions) == len(expected.attentions)
        for ours, reference in zip(attentions, expected.attentions):
            assert ours.shape == tuple(reference.shape)
            assert np.abs(ours - reference.numpy()).max() < ATOL


def test_metadata_carries_the_threshold_and_the_input_convention(export, model_dir):
    import onnx

    metadata = {prop.key: prop.value for prop in onnx.load(str(export[0])).metadata_props}
    config = json.loads((model_dir / "config.json").read_text())
    assert float(metadata["threshold"]) == config["threshold"]
    assert json.loads(metadata["id2label"]) == config["id2label"]
    assert metadata["pixel_values"].startswith("RGB in [0, 1]")
    assert json.loads(metadata["image_mean"]) == config["image_mean"] == [0.485, 0.456, 0.406]
    assert json.loads(metadata["image_std"]) == config["image_std"]


def test_predict_onnx_refuses_a_processor_that_normalises_again(export, frames, tmp_path):
    from polyp_segmentation.testing import save_as_normalised_input_folder

    folder = save_as_normalised_input_folder(REPO_ROOT, tmp_path / "normalising_processor")
    result = run_script("predict.py", frames[0], "--model", folder, "--onnx", export[0], "--output_dir", tmp_path)
    assert result.returncode != 0
    assert "the image processor normalises (do_normalize true) and so does the model" in result.stderr


def test_predict_onnx_gives_the_pytorch_masks(export, model_dir, frames, tmp_path):
    """predict.py --onnx against the PyTorch model run in-process, at the frame's original size."""
    from transformers import AutoImageProcessor, AutoModel

    frame = frames[0]
    result = run_script("predict.py", frame, "--model", model_dir, "--onnx", export[0], "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    onnx_mask = np.asarray(PIL.Image.open(tmp_path / f"{frame.stem}_mask.png")) > 0

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    image = PIL.Image.open(frame)
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    torch_mask = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy() > 0

    assert onnx_mask.shape == torch_mask.shape == image.size[::-1]
    assert 0.01 < torch_mask.mean() < 0.99  # neither empty nor full, or the comparison would be vacuous
    # Only a pixel whose probability lies within float error of the threshold may differ.
    assert (torch_mask != onnx_mask).mean() <= 1e-4
