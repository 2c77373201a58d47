"""predict.py end to end on real Kvasir-SEG frames and on unusual image files, with the tiny model."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from polyp_segmentation.testing import REPO_ROOT


def run_script(*args: str) -> subprocess.CompletedProcess:
    # One thread: the tiny model gains nothing from more, and OpenMP threads slow down badly on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def original_size(path: Path) -> tuple[int, int]:
    """`(width, height)` as displayed, i.e. after the EXIF orientation."""
    with PIL.Image.open(path) as image:
        return PIL.ImageOps.exif_transpose(image).size


def assert_mask_and_overlay(output_dir: Path, stem: str, size: tuple[int, int]) -> None:
    with PIL.Image.open(output_dir / f"{stem}_mask.png") as mask:
        assert mask.mode == "L" and mask.size == size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    with PIL.Image.open(output_dir / f"{stem}_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size == size


@pytest.fixture(scope="module")
def num_gates(tiny_model_dir) -> int:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        return len(model(pixel_values=torch.zeros(1, 3, 64, 64), output_attentions=True).attentions)


@pytest.fixture(scope="module")
def kvasir_run(kvasir_root, tiny_model_dir, tmp_path_factory):
    """A folder of 3 Kvasir-SEG frames, a truncated JPEG and a text file named .png, and a glob that matches
    nothing, predicted in batches of 2."""
    inputs = tmp_path_factory.mktemp("kvasir_inputs")
    frames = sorted((kvasir_root / "images").glob("*.jpg"))[:3]
    for frame in frames:
        shutil.copy(frame, inputs)
    (inputs / "truncated.jpg").write_bytes(frames[0].read_bytes()[:2000])
    (inputs / "not_an_image.png").write_text("hello")
    output_dir = tmp_path_factory.mktemp("kvasir_predictions")
    result = run_script("predict.py", inputs, inputs / "missing_*.jpg", "--model", tiny_model_dir,
                        "--output_dir", output_dir, "--attention_maps", "--batch_size", "2")
    return frames, output_dir, result


def test_medium_matmul_precision_gives_the_same_masks(kvasir_run, tiny_model_dir, tmp_path):
    frames, output_dir, _ = kvasir_run
    result = run_script("predict.py", *frames, "--model", tiny_model_dir, "--output_dir", tmp_path,
                        "--float32_matmul_precision", "medium")
    assert result.returncode == 0, result.stderr[-3000:]
    for frame in frames:
        masks = [np.asarray(PIL.Image.open(folder / f"{frame.stem}_mask.png")) for folder in (output_dir, tmp_path)]
        assert (masks[0] == masks[1]).mean() > 0.999, frame.name


def test_bad_files_are_reported_and_the_rest_processed(kvasir_run):
    frames, output_dir, result = kvasir_run
    assert result.returncode == 1, result.stderr
    assert "truncated.jpg" in result.stderr and "not_an_image.png" in result.stderr
    assert "missing_*.jpg" in result.stderr
    for frame in frames:
        assert frame.name not in result.stderr
        assert (output_dir / f"{frame.stem}_mask.png").is_file()
    written = {path.name for path in output_dir.iterdir()}
    assert not any(name.startswith(("truncated", "not_an_image")) for name in written)


def test_masks_and_overlays_at_original_size(kvasir_run):
    frames, output_dir, result = kvasir_run
    assert all(original_size(frame) != (256, 256) for frame in frames)  # so that resizing back is exercised
    for frame in frames:
        assert_mask_and_overlay(output_dir, frame.stem, original_size(frame))


def test_attention_maps_one_per_gate_at_original_size(kvasir_run, num_gates):
    frames, output_dir, result = kvasir_run
    for frame in frames:
        maps = sorted(output_dir.glob(f"{frame.stem}_attention_*.png"))
        assert [path.name for path in maps] == [f"{frame.stem}_attention_{i}.png" for i in range(num_gates)]
        for path in maps:
            with PIL.Image.open(path) as heat_map:
                assert heat_map.mode == "RGB" and heat_map.size == original_size(frame)


def test_grayscale_rgba_16bit_exif_and_tiff_inputs(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    PIL.Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8), "L").save(inputs / "gray.png")
    PIL.Image.fromarray(rng.integers(0, 256, (70, 50, 4), dtype=np.uint8), "RGBA").save(inputs / "rgba.png")
    PIL.Image.fromarray(rng.integers(0, 65536, (64, 80), dtype=np.uint16)).save(inputs / "deep.png")
    assert PIL.Image.open(inputs / "deep.png").mode.startswith("I")  # really 16-bit on disk
    rotated = PIL.Image.fromarray(rng.integers(0, 256, (40, 100, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(inputs / "rotated.jpg", exif=exif)
    PIL.Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(inputs / "frame.tif")
    output_dir = tmp_path / "predictions"

    result = run_script("predict.py", inputs / "*.png", inputs / "rotated.jpg", inputs / "frame.tif",
                        "--model", tiny_model_dir, "--output_dir", output_dir)

    assert result.returncode == 0, result.stderr
    expected = {"gray": (120, 90), "rgba": (50, 70), "deep": (80, 64), "rotated": (40, 100), "frame": (47, 33)}
    for stem, size in expected.items():
        assert_mask_and_overlay(output_dir, stem, size)
    assert not list(output_dir.glob("*_attention_*.png"))


def test_overlay_fills_and_outlines_the_mask():
    from polyp_segmentation import drawing

    frame = np.full((60, 80, 3), 100, dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=bool)
    mask[20:40, 30:60] = True
    overlay = drawing.overlay_mask(frame, mask)
    assert (overlay[~mask] == frame[~mask]).all()  # outside untouched
    assert (overlay[mask[:, :, None].repeat(3, -1)].reshape(-1, 3) != 100).any(axis=1).all()  # inside changed
    assert (overlay[20, 45] == drawing.OVERLAY_COLOR).all()  # the border is drawn in the solid colour
    inside = overlay[30, 45].astype(float)  # the interior is blended
    assert np.allclose(inside, (1 - drawing.OVERLAY_ALPHA) * 100 + drawing.OVERLAY_ALPHA * drawing.OVERLAY_COLOR,
                       atol=1)
