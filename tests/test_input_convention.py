"""The model takes RGB in [0, 1] and normalises it itself (config `image_mean` / `image_std`), so the original model
card's usage code, which feeds `to_tensor` output straight in, gets the masks the image processor path gets; folders
saved before (config without the statistics, a processor that normalises) load and behave as they did."""

import json
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from polyp_segmentation.testing import REPO_ROOT, TINY_OVERRIDES, make_model, save_as_normalised_input_folder

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoImageProcessor, AutoModel

    return (AutoModel.from_pretrained(REPO_ROOT, trust_remote_code=True).eval(),
            AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True))


@pytest.fixture(scope="module")
def shipped_as_saved_before(tmp_path_factory):
    from transformers import AutoImageProcessor, AutoModel

    folder = save_as_normalised_input_folder(REPO_ROOT, tmp_path_factory.mktemp("normalised_input"))
    return (AutoModel.from_pretrained(folder, trust_remote_code=True).eval(),
            AutoImageProcessor.from_pretrained(folder, trust_remote_code=True), folder)


def dice(first: torch.Tensor, second: torch.Tensor) -> float:
    total = first.sum() + second.sum()
    return 1.0 if total == 0 else float(2 * (first & second).sum() / total)


def test_original_card_snippet_gives_the_processor_masks_on_test_frames(shipped, kvasir_root, test_split_names):
    import torchvision.transforms.functional as TF

    model, processor = shipped
    scores, found = [], 0
    for name in test_split_names[:12]:
        image = PIL.Image.open(kvasir_root / "images" / f"{name}.jpg")
        with torch.no_grad():
            # The original card's "How to Use", verbatim but for the repository path.
            x = TF.to_tensor(TF.resize(image, [256, 256])).unsqueeze(0)
            mask = (model(pixel_values=x)["logits"].sigmoid() > 0.5).squeeze()
            reference = model(**processor(image, return_tensors="pt")).logits.sigmoid().squeeze() > 0.5
        found += bool(reference.float().mean() > 0.001)
        scores.append(dice(mask, reference))
    # Frames where the model finds no polyp compare empty masks; most must hold one, or the test would be vacuous.
    assert found >= 10, f"a polyp found on only {found} of 12 test frames"
    assert min(scores) >= 0.999, scores


def test_shipped_weights_give_the_logits_of_the_normalising_processor(shipped, shipped_as_saved_before):
    """Today's files and those saved before the change: the same function split differently, within float
    tolerance (the same floating-point operations, in another place)."""
    model, processor = shipped
    old_model, old_processor, _ = shipped_as_saved_before
    assert old_model.config.image_mean is None and old_model.pixel_normalization is None
    assert old_processor.do_normalize and not processor.do_normalize
    images = [PIL.Image.open(path) for path in EXAMPLES]
    new_inputs, old_inputs = processor(images, return_tensors="pt"), old_processor(images, return_tensors="pt")
    assert 0.0 <= new_inputs["pixel_values"].min() and new_inputs["pixel_values"].max() <= 1.0
    assert old_inputs["pixel_values"].min() < -1.0
    with torch.no_grad():
        logits, old_logits = model(**new_inputs).logits, old_model(**old_inputs).logits
    torch.testing.assert_close(logits, old_logits, rtol=0, atol=1e-5)


def test_a_folder_saved_before_the_change_keeps_its_pipeline_masks(shipped_as_saved_before):
    from transformers import pipeline

    folder = shipped_as_saved_before[2]
    old = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)
    new = pipeline("image-segmentation", model=str(REPO_ROOT), trust_remote_code=True)
    for path in EXAMPLES[:2]:
        masks = [{s["label"]: np.asarray(s["mask"]) for s in segmenter(str(path))} for segmenter in (old, new)]
        assert masks[0].keys() == masks[1].keys() == {"background", "polyp"}
        assert (masks[0]["polyp"] != masks[1]["polyp"]).mean() < 1e-4


def test_config_without_the_statistics_loads_as_normalised_input_and_new_configs_normalise(tmp_path):
    from transformers import AutoConfig

    fresh = type(AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True))()
    assert fresh.image_mean == [0.485, 0.456, 0.406] and fresh.image_std == [0.229, 0.224, 0.225]
    saved = json.loads((REPO_ROOT / "config.json").read_text())
    assert saved["image_mean"] == fresh.image_mean
    for key in ("image_mean", "image_std"):
        del saved[key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    for name in ("configuration_attention_unet.py", "modeling_attention_unet.py"):
        (tmp_path / name).write_text((REPO_ROOT / name).read_text())
    old = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert old.image_mean is None and old.image_std is None
    old.save_pretrained(tmp_path / "again")  # None is written as null and stays None
    assert AutoConfig.from_pretrained(tmp_path / "again", trust_remote_code=True).image_mean is None
    grayscale = type(fresh)(num_channels=1)
    assert grayscale.image_mean == [pytest.approx(0.449)] and grayscale.image_std == [pytest.approx(0.226)]


@pytest.mark.parametrize("overrides, message", [
    ({"image_mean": [0.5, 0.5]}, r"one value per input channel \(3\)"),
    ({"image_std": None}, "both hold one value per input channel"),
    ({"image_mean": None}, "image_std.*image_mean. is None"),
])
def test_inconsistent_statistics_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_model(**TINY_OVERRIDES, **overrides)


@pytest.mark.parametrize("value", [[0.2, 0.0, 0.2], [0.2, -1.0, 0.2], "imagenet", [float("nan")] * 3])
def test_a_bad_image_std_is_refused_naming_the_field(value):
    from polyp_segmentation.testing import make_config

    with pytest.raises(ValueError, match="image_std"):
        make_config(image_std=value)


def unit_range_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 64, generator=generator)


@pytest.mark.parametrize("scale, cause", [
    (lambda x: x * 255.0, "0-255 values"),
    (lambda x: (x - 0.45) / 0.225, "normalised already"),
], ids=["0-255", "normalised"])
def test_the_first_input_outside_the_unit_range_warns_once(scale, cause):
    model = make_model(**TINY_OVERRIDES)
    with torch.no_grad(), pytest.warns(UserWarning, match=cause):
        model(scale(unit_range_batch()))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(scale(unit_range_batch()))  # checked once per model: no second host read, no second warning


def test_unit_range_input_does_not_warn():
    model = make_model(**TINY_OVERRIDES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(unit_range_batch())
    assert model.input_range_checked


def test_scripts_refuse_a_processor_and_model_that_both_normalise(tiny_model_dir, tmp_path):
    import shutil

    for path in tiny_model_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**processor, "do_normalize": True}))
    completed = subprocess.run([sys.executable, "predict.py", str(EXAMPLES[0]), "--model", str(tmp_path),
                                "--output_dir", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode != 0
    assert f"{tmp_path}: the image processor normalises" in completed.stderr and "twice" in completed.stderr


# The last commit before the model normalised its inputs: its config, processor config and remote code.
PRE_NORMALIZATION_COMMIT = "8fc11d3"
FOLDER_FILES = ("config.json", "preprocessor_config.json", "configuration_attention_unet.py",
                "modeling_attention_unet.py", "image_processing_attention_unet.py")


@pytest.fixture(scope="module")
def folder_of_the_earlier_code(tmp_path_factory):
    """The shipped weights in a folder as this repository held them before the change, code included."""
    folder = tmp_path_factory.mktemp("earlier_code")
    for name in FOLDER_FILES:
        shown = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{PRE_NORMALIZATION_COMMIT}:{name}"],
                               capture_output=True)
        if shown.returncode != 0:
            pytest.skip(f"commit {PRE_NORMALIZATION_COMMIT} is not in this checkout's history")
        (folder / name).write_bytes(shown.stdout)
    (folder / "model.safetensors").symlink_to(REPO_ROOT / "model.safetensors")
    return folder


def test_scripts_run_a_folder_saved_by_the_earlier_code_and_give_todays_masks(folder_of_the_earlier_code, tmp_path):
    outputs = {}
    for name, model in (("earlier", folder_of_the_earlier_code), ("today", REPO_ROOT)):
        completed = subprocess.run([sys.executable, "predict.py", str(EXAMPLES[0]), "--model", str(model),
                                    "--output_dir", str(tmp_path / name)], cwd=REPO_ROOT, capture_output=True,
                                   text=True)
        assert completed.returncode == 0, completed.stderr[-3000:]
        outputs[name] = np.asarray(PIL.Image.open(tmp_path / name / f"{EXAMPLES[0].stem}_mask.png")) > 0
        assert (tmp_path / name / "predictions.csv").read_text().startswith("name,polyp_present,polyp_score")
    assert outputs["today"].mean() > 0.01 and (outputs["earlier"] != outputs["today"]).mean() < 1e-4
