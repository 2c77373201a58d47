"""End to end through a local Hub (`tests/hub_server.py`), with the real clients and the real scripts:

1. a small Kvasir-SEG subset goes up with `DatasetDict.push_to_hub` and comes back with `load_dataset`;
2. `train_accelerate.py` trains one short epoch on that Hub copy and pushes to `user/tiny-unet`; the server refuses
   the first repository creation, so the first push fails (a warning, training goes on) and the final push retries;
3. a fresh process loads the Hub model with `AutoModel` and `pipeline(..., trust_remote_code=True)` and gets what the
   local `--output_dir` gives; `evaluate_model.py` runs on the Hub model and the Hub dataset;
4. with the Hub answering 500 to everything, training still ends with exit 0 and a complete local folder.

Every client runs in its own process, so `HF_ENDPOINT` and `HF_HOME` are set before `huggingface_hub` is imported.
"""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import HubServer, last_json_line, run_python

from polyp_segmentation.testing import REPO_ROOT, TINY_CONFIG_OVERRIDES, TINY_OVERRIDES

DATASET_ID = "user/kvasir-seg-tiny"
MODEL_ID = "user/tiny-unet"
NUM_TRAIN, NUM_VALIDATION = 8, 4
CODE_FILES = ("configuration_attention_unet.py", "modeling_attention_unet.py", "image_processing_attention_unet.py")
LOCAL_FOLDER_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", *CODE_FILES}
PUSH_WARNING = f"warning: push to {MODEL_ID} failed"


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


def train(env: dict, output_dir: Path, dataset: str, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--dataset_name", dataset,
        "--output_dir", str(output_dir), "--config_overrides", TINY_CONFIG_OVERRIDES, "--resolution", "64", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
        "--mixed_precision", "no", "--report_to", "none", "--seed", "3",
        "--push_to_hub", "--hub_model_id", MODEL_ID, *extra,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def hub_dataset(hub, kvasir_root, tmp_path_factory) -> dict:
    """Pushes 8 train + 4 validation images (name / image / annotation, `datasets.Image` features, resized small),
    then reads them back with `load_dataset` into an empty cache, in the same process."""
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        import datasets
        import numpy as np
        from PIL import Image

        root, repo_id, cache_dir, num_train, num_validation = sys.argv[1:6]
        root = Path(root)
        features = datasets.Features({"name": datasets.Value("string"), "image": datasets.Image(),
                                      "annotation": datasets.Image()})

        def split(names):
            rows = {"name": [], "image": [], "annotation": []}
            for name in names:
                rows["name"].append(name)
                rows["image"].append(Image.open(root / "images" / f"{name}.jpg").convert("RGB").resize((80, 72)))
                mask = Image.open(root / "masks" / f"{name}.jpg").convert("L").resize((80, 72), Image.NEAREST)
                rows["annotation"].append(mask.point(lambda value: 255 if value > 127 else 0))
            return datasets.Dataset.from_dict(rows, features=features)

        pushed = datasets.DatasetDict({
            "train": split((root / "splits" / "train.txt").read_text().split()[: int(num_train)]),
            "validation": split((root / "splits" / "validation.txt").read_text().split()[: int(num_validation)]),
        })
        commit = pushed.push_to_hub(repo_id)
        loaded = datasets.load_dataset(repo_id, cache_dir=cache_dir)
        same = all(
            np.array_equal(np.asarray(a[column]), np.asarray(b[column])) and a["name"] == b["name"]
            for split_name in pushed for a, b in zip(pushed[split_name], loaded[split_name])
            for column in ("image", "annotation")
        )
        print(json.dumps({
            "commit": commit.oid, "splits": {name: loaded[name].num_rows for name in loaded},
            "columns": loaded["train"].column_names,
            "features": {name: type(feature).__name__ for name, feature in loaded["train"].features.items()},
            "image_size": list(loaded["train"][0]["image"].size), "same_pixels": same,
            "validation_names": list(loaded["validation"]["name"]),
        }))
    """)
    env = hub.client_env(tmp_path_factory.mktemp("dataset_hf_home"))
    completed = run_python(code, env, str(kvasir_root), DATASET_ID, str(tmp_path_factory.mktemp("load_cache")),
                           str(NUM_TRAIN), str(NUM_VALIDATION), timeout=300)
    return last_json_line(completed)


@pytest.fixture(scope="module")
def hub_training(hub, hub_dataset, tmp_path_factory):
    """One short epoch on the Hub dataset, pushing to the Hub; the first repository creation answers 500."""
    output_dir = tmp_path_factory.mktemp("hub_run") / "output"
    env = hub.client_env(tmp_path_factory.mktemp("training_hf_home"))
    hub.inject_failures(500, count=1, path=r"^/api/repos/create$")
    try:
        completed = train(env, output_dir, DATASET_ID)
    finally:
        hub.clear_failures()
    assert completed.returncode == 0, completed.stderr[-6000:]
    return output_dir, completed


def test_dataset_push_and_load_roundtrip(hub, hub_dataset, kvasir_root):
    assert hub_dataset["commit"] == hub.head(DATASET_ID, "dataset")
    assert hub_dataset["splits"] == {"train": NUM_TRAIN, "validation": NUM_VALIDATION}
    assert hub_dataset["columns"] == ["name", "image", "annotation"]
    assert hub_dataset["features"] == {"name": "Value", "image": "Image", "annotation": "Image"}
    assert hub_dataset["image_size"] == [80, 72] and hub_dataset["same_pixels"]
    expected = (kvasir_root / "splits" / "validation.txt").read_text().split()[:NUM_VALIDATION]
    assert hub_dataset["validation_names"] == expected
    files = hub.files(DATASET_ID, "dataset")
    parquet = sorted(path for path in files if path.endswith(".parquet"))
    assert [Path(path).name.split("-")[0] for path in parquet] == ["train", "validation"]
    assert all(files[path]["lfs"] for path in parquet) and "README.md" in files


def test_training_on_the_hub_dataset_retries_a_failed_push(hub, hub_training):
    output_dir, completed = hub_training
    log = completed.stderr
    assert f"{NUM_TRAIN} training / {NUM_VALIDATION // 2} validation images" in log  # validation halved into test
    warnings = [line for line in log.splitlines() if line.startswith(PUSH_WARNING)]
    assert len(warnings) == 1 and "500" in warnings[0]  # the epoch's push failed and said so ...
    assert "The final push failed" not in log  # ... and the final push went through
    creations = [status for method, path, status in hub.requests if path == "/api/repos/create"]
    assert creations[-2:] == [500, 200]
    files = hub.files(MODEL_ID)
    assert LOCAL_FOLDER_FILES <= set(files)
    assert not any(path.startswith(("checkpoints/", "runs/", ".hub_snapshot")) for path in files)
    assert files["model.safetensors"]["lfs"]
    for name in LOCAL_FOLDER_FILES:
        assert hub.read(MODEL_ID, name) == (output_dir / name).read_bytes(), name
    titles = [commit["title"] for commit in hub.commits(MODEL_ID)]
    assert titles[0].startswith("end of training") and titles[-1] == "initial commit"


def test_fresh_process_loads_the_hub_model_like_the_local_folder(hub, hub_training, kvasir_root, tmp_path):
    output_dir, _ = hub_training
    image = kvasir_root / "images" / f"{(kvasir_root / 'splits' / 'test.txt').read_text().split()[0]}.jpg"
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, pipeline

        repo_id, local_dir, revision, image_path = sys.argv[1:5]
        hub_model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
        pinned = AutoModel.from_pretrained(repo_id, revision=revision, trust_remote_code=True).eval()
        local_model = AutoModel.from_pretrained(local_dir, trust_remote_code=True).eval()
        image = Image.open(image_path).convert("RGB").resize((120, 96))
        hub_inputs = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True)(image, return_tensors="pt")
        local_inputs = AutoImageProcessor.from_pretrained(local_dir, trust_remote_code=True)(image, return_tensors="pt")
        with torch.no_grad():
            hub_logits = hub_model(**hub_inputs).logits
            local_logits = local_model(**local_inputs).logits
            pinned_logits = pinned(**hub_inputs).logits
        hub_masks = pipeline("image-segmentation", model=repo_id, trust_remote_code=True)(image)
        local_masks = pipeline("image-segmentation", model=local_dir, trust_remote_code=True)(image)
        print(json.dumps({
            "module": type(hub_model).__module__,
            "encoder": hub_model.config.encoder_name,
            "decoder": hub_model.config.decoder_channels,
            "logits_shape": list(hub_logits.shape),
            "same_logits": torch.equal(hub_logits, local_logits) and torch.equal(pinned_logits, local_logits),
            "labels": [[m["label"] for m in hub_masks], [m["label"] for m in local_masks]],
            "mask_sizes": [list(m["mask"].size) for m in hub_masks],
            "same_masks": len(hub_masks) == len(local_masks) and all(
                np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"])) for a, b in zip(hub_masks, local_masks)),
        }))
    """)
    env = hub.client_env(tmp_path / "fresh_hf_home")
    result = last_json_line(run_python(code, env, MODEL_ID, str(output_dir), hub.head(MODEL_ID), str(image),
                                       timeout=300))
    assert result["module"].startswith("transformers_modules.")  # the code came from the Hub repository
    assert result["encoder"] == TINY_OVERRIDES["encoder_name"]
    assert result["decoder"] == TINY_OVERRIDES["decoder_channels"]
    assert result["logits_shape"] == [1, 1, 64, 64] and result["same_logits"]
    assert result["labels"][0] == result["labels"][1] and result["labels"][0]
    assert all(size == [120, 96] for size in result["mask_sizes"]) and result["same_masks"]


def test_evaluate_runs_on_the_hub_model_and_dataset(hub, hub_training, tmp_path):
    output_dir, _ = hub_training
    output_json = tmp_path / "eval.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate_model.py"), "--model", MODEL_ID, "--dataset_name", DATASET_ID,
         "--split", "test", "--resolution", "64", "--output_json", str(output_json), "--trust_remote_code"],
        cwd=REPO_ROOT, env=hub.client_env(tmp_path / "fresh_hf_home"), capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-6000:]
    assert "| metric | mean over images | pooled over pixels |" in completed.stdout
    result = json.loads(output_json.read_text())
    assert (result["model"], result["dataset_name"], result["split"]) == (MODEL_ID, DATASET_ID, "test")
    assert result["num_images"] == NUM_VALIDATION - NUM_VALIDATION // 2
    assert result["revision"] == hub.head(MODEL_ID)
    assert result["weights_sha256"] == hashlib.sha256((output_dir / "model.safetensors").read_bytes()).hexdigest()


def test_training_finishes_with_a_complete_local_folder_when_the_hub_is_down(kvasir_root, tmp_path):
    with HubServer() as down:
        down.fail_with = 500
        output_dir = tmp_path / "output"
        completed = train(down.client_env(tmp_path / "hf_home"), output_dir, str(kvasir_root),
                          "--max_train_samples", str(NUM_TRAIN), "--max_eval_samples", "2")
        assert completed.returncode == 0, completed.stderr[-6000:]
        assert PUSH_WARNING in completed.stderr and "The final push failed" in completed.stderr
        assert LOCAL_FOLDER_FILES <= {path.name for path in output_dir.iterdir()}
        config = json.loads((output_dir / "config.json").read_text())
        assert config["encoder_name"] == TINY_OVERRIDES["encoder_name"] and config["auto_map"]
        assert (output_dir / "model.safetensors").stat().st_size > 0
        # The epoch's push and the three final attempts each got as far as creating the repository.
        assert [status for _, path, status in down.requests if path == "/api/repos/create"] == [500] * 4
        assert not down.repo_exists(MODEL_ID)


def test_a_hub_copy_without_usable_columns_is_a_clear_error_until_they_are_named(hub, kvasir_root, tmp_path):
    code = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        import datasets
        from PIL import Image
        from polyp_segmentation.data import DataError, load_hub_splits

        root, repo_id = Path(sys.argv[1]), sys.argv[2]
        names = (root / "splits" / "train.txt").read_text().split()[:2]
        rows = {"img": [Image.open(root / "images" / f"{n}.jpg").convert("RGB").resize((32, 32)) for n in names],
                "seg": [Image.open(root / "masks" / f"{n}.jpg").convert("L").resize((32, 32)) for n in names]}
        features = datasets.Features({"img": datasets.Image(), "seg": datasets.Image()})
        table = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict({"train": table, "validation": table}).push_to_hub(repo_id)
        try:
            load_hub_splits(repo_id)
            error = None
        except DataError as raised:
            error = str(raised)
        splits, _ = load_hub_splits(repo_id, image_column_name="img", label_column_name="seg")
        print(json.dumps({"error": error, "sizes": {name: len(samples) for name, samples in splits.items()}}))
    """)
    env = {**hub.client_env(tmp_path / "hf_home"), "PYTHONPATH": str(REPO_ROOT)}
    result = last_json_line(run_python(code, env, str(kvasir_root), "user/odd-columns", timeout=300))
    assert "has no image column" in result["error"] and "['img', 'seg']" in result["error"]
    assert "--image_column_name" in result["error"]
    assert result["sizes"] == {"train": 2, "validation": 1, "test": 1}
