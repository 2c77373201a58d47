"""The frame-level polyp score (a frame's largest polyp probability) and `config.presence_threshold`: frames judged
polyp-free get an empty mask from the processor, no polyp segment from the pipeline, a `polyp_present` of 0 in
predict.py's CSVs and "No polyp found" in the app."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.modeling_outputs import SemanticSegmenterOutput

from polyp_segmentation.testing import REPO_ROOT

EXAMPLE = sorted((REPO_ROOT / "examples").glob("*.jpg"))[0]


def processor():
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)


def test_score_is_the_largest_probability_and_low_scoring_frames_get_empty_masks():
    logits = torch.full((3, 1, 8, 8), -5.0)
    logits[1, 0, 2:4, 2:4] = 0.5   # a faint polyp: score sigmoid(0.5) = 0.62
    logits[2, 0, 1:6, 1:6] = 4.0   # a clear one: score 0.98
    outputs = SemanticSegmenterOutput(logits=logits)
    scores = processor().post_process_polyp_scores(outputs)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([-5.0, 0.5, 4.0])))
    plain = processor().post_process_semantic_segmentation(outputs)
    gated = processor().post_process_semantic_segmentation(outputs, presence_threshold=0.9)
    assert [int(mask.sum()) for mask in plain] == [0, 4, 25]
    assert [int(mask.sum()) for mask in gated] == [0, 0, 25]


@pytest.fixture(scope="module")
def gated_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a constant head: every pixel's probability sigmoid(1) = 0.73, and presence thresholds in
    the config on either side of it."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("gated")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["segmentation_head.weight"].zero_()
    weights["segmentation_head.bias"].fill_(1.0)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def with_presence_threshold(folder, value, destination):
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**config, "presence_threshold": value}))
    return destination


@pytest.mark.parametrize("presence_threshold, present", [(0.9, False), (0.6, True), (None, True)])
def test_pipeline_has_no_polyp_segment_for_a_frame_judged_free_and_the_score_otherwise(
        gated_model_dir, tmp_path, presence_threshold, present):
    from transformers import pipeline

    folder = with_presence_threshold(gated_model_dir, presence_threshold, tmp_path / "model")
    segments = pipeline("image-segmentation", model=str(folder), trust_remote_code=True)(str(EXAMPLE))
    labels = {segment["label"]: segment for segment in segments}
    if present:
        assert set(labels) == {"polyp"} and labels["polyp"]["score"] == pytest.approx(float(torch.sigmoid(
            torch.tensor(1.0))), abs=1e-5)
        assert (np.asarray(labels["polyp"]["mask"]) > 0).all()
    else:
        assert set(labels) == {"background"} and labels["background"]["score"] is None


def test_config_refuses_a_presence_threshold_outside_the_unit_interval():
    from polyp_segmentation.testing import make_config

    with pytest.raises(ValueError, match="presence_threshold"):
        make_config(presence_threshold=1.5)


def test_predict_writes_the_frame_level_csv(gated_model_dir, tmp_path):
    folder = with_presence_threshold(gated_model_dir, 0.9, tmp_path / "model")
    for flags, present in (([], "0"), (["--presence_threshold", "0.5"], "1")):
        output_dir = tmp_path / f"out{present}"
        completed = subprocess.run([sys.executable, "predict.py", str(EXAMPLE), "--model", str(folder),
                                    "--output_dir", str(output_dir), *flags], cwd=REPO_ROOT, capture_output=True,
                                   text=True)
        assert completed.returncode == 0, completed.stderr[-3000:]
        with open(output_dir / "predictions.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        assert list(rows[0]) == ["name", "polyp_present", "polyp_score", "polyp_area_fraction"]
        assert [row["name"] for row in rows] == [EXAMPLE.stem] and rows[0]["polyp_present"] == present
        assert float(rows[0]["polyp_score"]) == pytest.approx(0.731059, abs=1e-5)
        mask = np.asarray(PIL.Image.open(output_dir / f"{EXAMPLE.stem}_mask.png")) > 0
        assert float(rows[0]["polyp_area_fraction"]) == pytest.approx(mask.mean()) == float(present == "1")


def test_app_says_no_polyp_found_with_the_score(gated_model_dir, tmp_path):
    from transformers import AutoModel

    from app import build_demo

    folder = with_presence_threshold(gated_model_dir, 0.9, tmp_path / "model")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    demo = build_demo(model, processor())
    (segment_frame,) = [block.fn for block in demo.fns.values() if block.api_name == "segment_frame"]
    *_, mask, summary = segment_frame(str(EXAMPLE), 0.5, False)
    assert summary.startswith("**No polyp found** (score 0.731)") and not mask.any()
