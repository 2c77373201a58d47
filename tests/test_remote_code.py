"""Remote code only on request: every script that takes a Hub id refuses it without `--trust_remote_code`, before
anything is downloaded (the local Hub sees no request), while this repository's own folder needs no flag."""

import subprocess
import sys

import pytest
from hub_server import HubServer

from polyp_segmentation.testing import REPO_ROOT

HUB_ID = "someone/attention-unet-fork"
EXAMPLE = sorted((REPO_ROOT / "examples").glob("*.jpg"))[0]


def script_commands(tmp_path):
    out = tmp_path / "out"
    return {
        "evaluate --model": ["evaluate_model.py", "--model", HUB_ID, "--dataset_name", str(tmp_path / "unused")],
        "predict --model": ["predict.py", str(EXAMPLE), "--model", HUB_ID, "--output_dir", str(out)],
        "export_onnx --model": ["export_onnx.py", "--model", HUB_ID, "--output", str(out / "model.onnx")],
        "train --init_from": ["train_accelerate.py", "--init_from", HUB_ID, "--output_dir", str(out)],
        "train --config_name": ["train_accelerate.py", "--config_name", HUB_ID, "--output_dir", str(out)],
        "bench_cpu --model": ["benchmarks/bench_cpu.py", "--model", HUB_ID],
        "fit_probe --config_name": ["benchmarks/fit_probe.py", "--config_name", HUB_ID],
    }


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.mark.parametrize("case", list(script_commands(REPO_ROOT)))
def test_scripts_refuse_a_hub_id_without_trust_remote_code(case, hub, tmp_path):
    script, *arguments = script_commands(tmp_path)[case]
    completed = subprocess.run([sys.executable, str(REPO_ROOT / script), *arguments], cwd=REPO_ROOT,
                               env=hub.client_env(tmp_path / "hf_home"), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-3000:]
    flag = case.split()[-1]
    assert f"{flag} {HUB_ID}" in completed.stderr and "--trust_remote_code" in completed.stderr
    assert hub.requests == [], "the script contacted the Hub before refusing"
    assert not (tmp_path / "out").exists()


def test_a_local_folder_whose_auto_map_points_at_another_repository_needs_the_flag(tmp_path):
    import json
    import shutil

    from polyp_segmentation.loading import UntrustedRemoteCodeError, check_remote_code_allowed

    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((REPO_ROOT / "config.json").read_text())
    config["auto_map"]["AutoModel"] = f"{HUB_ID}--modeling_attention_unet.AttentionUNetForSemanticSegmentation"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UntrustedRemoteCodeError, match=HUB_ID):
        check_remote_code_allowed(folder, trust_remote_code=False)
    check_remote_code_allowed(folder, trust_remote_code=True)
    shutil.rmtree(folder)


def test_this_repository_and_hub_ids_with_the_flag_are_allowed():
    from polyp_segmentation.loading import check_remote_code_allowed

    check_remote_code_allowed(REPO_ROOT, trust_remote_code=False)
    check_remote_code_allowed(HUB_ID, trust_remote_code=True)
