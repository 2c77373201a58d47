"""The remote code under the transformers and timm releases downstream projects pin: transformers 4.57 (the last 4.x,
the oldest supported), 5.0.0 and the pinned newest; timm 1.0.20 (the release of 4.57's time) and the pinned 1.0.31.
Each release is installed with `pip install --target` next to the pinned torch (timm without its dependencies, so no
torch is reinstalled), and the same probe (config, `AutoModel`, `AutoModelForSemanticSegmentation`,
`AutoImageProcessor`, the pipeline with `threshold=`) must give the pinned release's logits and masks. Needs the
package registry; skips without it, except under CI (`CI=true`), where it fails."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from polyp_segmentation.testing import REPO_ROOT

pytestmark = pytest.mark.slow

RELEASES = {
    "transformers 4.57.6": ["transformers==4.57.6"],
    "transformers 5.0.0": ["transformers==5.0.0"],
    "timm 1.0.20": ["timm==1.0.20"],
    "transformers 4.57.6 + timm 1.0.20": ["transformers==4.57.6", "timm==1.0.20"],
}
INSTALL_CACHE = Path(os.environ.get("ATTENTION_UNET_COMPAT_CACHE", Path.home() / ".cache" / "attention-unet-compat"))
EXAMPLE = sorted((REPO_ROOT / "examples").glob("*.jpg"))[0]

PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np, PIL.Image, timm, torch, transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline

    repo, image_path, output = sys.argv[1:4]
    config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    for_segmentation = AutoModelForSemanticSegmentation.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
    image = PIL.Image.open(image_path)
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        same = torch.equal(logits, for_segmentation(**inputs).logits)
    segmenter = pipeline("image-segmentation", model=repo, trust_remote_code=True)
    areas = {str(threshold): {s["label"]: float((np.asarray(s["mask"]) > 0).mean()) for s in segmenter(image, **kwargs)}
             for threshold, kwargs in ((None, {}), (0.2, {"threshold": 0.2}), (0.8, {"threshold": 0.8}))}
    np.save(output, logits.numpy())
    print(json.dumps({"versions": [transformers.__version__, timm.__version__], "config": type(config).__name__,
                      "pipeline": type(segmenter).__name__, "same_auto_classes": same, "areas": areas}))
""")


def run_probe(tmp_path: Path, name: str, pythonpath: str | None = None) -> tuple[dict, np.ndarray]:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / f"modules-{name}"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    output = tmp_path / f"logits-{name}.npy"
    completed = subprocess.run([sys.executable, "-c", PROBE, str(REPO_ROOT), str(EXAMPLE), str(output)], env=env,
                               capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), np.load(output)


def installed_release(requirement: str) -> Path:
    """`requirement` (with its own dependencies, except timm's) in a folder of its own, cached between runs."""
    package = requirement.split("==")[0]
    target = INSTALL_CACHE / requirement.replace("==", "-")
    if (target / package).is_dir():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts", "--target", str(partial),
         *(["--no-deps"] if package == "timm" else []), requirement], capture_output=True, text=True, timeout=900,
    )
    if completed.returncode != 0:
        message = f"could not install {requirement}: {completed.stderr.strip()[-1500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if (partial / "torch").exists() or (package != "timm" and (partial / "timm").exists()):
        pytest.fail(f"installing {requirement} pulled in torch or timm: the probe would not test the pins")
    partial.rename(target)
    return target


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    return run_probe(tmp_path_factory.mktemp("pinned"), "pinned")


@pytest.mark.parametrize("releases", list(RELEASES))
def test_same_logits_and_pipeline_under_other_releases(releases, pinned, tmp_path):
    import timm
    import transformers

    reference, reference_logits = pinned
    requirements = RELEASES[releases]
    pythonpath = os.pathsep.join(str(installed_release(requirement)) for requirement in requirements)
    result, logits = run_probe(tmp_path, releases.replace(" ", "_"), pythonpath)
    expected = dict(transformers=transformers.__version__, timm=timm.__version__)
    expected.update(requirement.split("==") for requirement in requirements)
    assert result["versions"] == [expected["transformers"], expected["timm"]]
    assert reference["versions"] == [transformers.__version__, timm.__version__]
    assert result["config"] == "AttentionUNetConfig" and result["pipeline"] == "AttentionUNetSegmentationPipeline"
    assert result["same_auto_classes"]
    np.testing.assert_allclose(logits, reference_logits, rtol=0, atol=1e-5)
    assert result["areas"] == reference["areas"]
    polyp = [result["areas"][threshold].get("polyp", 0.0) for threshold in ("0.2", "None", "0.8")]
    assert polyp[0] > polyp[1] > polyp[2], "threshold= is not honoured"
