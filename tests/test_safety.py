"""Safety: weights come only from safetensors, no pickle runs code on load or resume, the remote code imports only what
it should and does no I/O at import, damaged weight files fail naming the file and tensor.
"""

import argparse
import ast
import contextlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from polyp_segmentation.testing import REPO_ROOT, TINY_OVERRIDES

REMOTE_CODE_FILES = ("configuration_attention_unet.py", "modeling_attention_unet.py", "image_processing_attention_unet.py")
TINY_CONFIG_OVERRIDES = "encoder_name={},decoder_channels={}".format(
    TINY_OVERRIDES["encoder_name"], str(TINY_OVERRIDES["decoder_channels"]).replace(" ", "")
)
DECODER_TENSOR = "decoder.blocks.1.conv1.conv.weight"
UNEXPECTED_TENSOR = "decoder.blocks.1.extra_gate.weight"


# --------------------------------------------------------------------------------------------------------------------
# Malicious pickles


class Payload:
    """Unpickling this calls `open(marker, "w")`, creating the marker file: proof that the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_pickle(path: Path, marker: Path, torch_format: bool = True) -> None:
    if torch_format:  # a zip archive like a real `torch.save` checkpoint, the payload in place of a tensor
        torch.save({DECODER_TENSOR: Payload(marker), "state": {0: Payload(marker)}}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PICKLE_RAN_CODE"
    yield path
    assert not path.exists(), "a planted pickle ran code"


@pytest.fixture
def pickle_only_model_dir(tiny_model_dir, tmp_path, marker) -> Path:
    """A copy of the tiny model whose model.safetensors is replaced by a malicious pytorch_model.bin."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    write_malicious_pickle(folder / "pytorch_model.bin", marker)
    return folder


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch_zip", "raw_pickle"])
def test_the_payload_does_run_code_when_unpickled_unsafely(tmp_path, torch_format):
    """Guards the tests below against passing vacuously: an unsafe load of the payload does create the marker."""
    path, marker = tmp_path / "payload.bin", tmp_path / "marker"
    write_malicious_pickle(path, marker, torch_format)
    if torch_format:
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_use_safetensors_refuses_a_folder_with_only_a_pickle(pickle_only_model_dir, marker):
    from transformers import AutoModel

    with pytest.raises(OSError, match="model.safetensors"):
        AutoModel.from_pretrained(pickle_only_model_dir, trust_remote_code=True, use_safetensors=True)
    assert not marker.exists()


def test_evaluate_refuses_a_folder_with_only_a_pickle(pickle_only_model_dir, marker, tmp_path):
    import evaluate_model

    with pytest.raises((OSError, ValueError), match="model.safetensors"):
        evaluate_model.main(["--model", str(pickle_only_model_dir), "--dataset_name", str(tmp_path / "never_read"),
                       "--device", "cpu"])
    assert not marker.exists()


def test_every_script_loads_model_weights_with_use_safetensors():
    """Each `AutoModel*.from_pretrained(...)` in the repository's scripts passes `use_safetensors=True`."""
    offenders = []
    for path in sorted(REPO_ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.startswith("AutoModel")):
                flag = {kw.arg: kw.value for kw in node.keywords}.get("use_safetensors")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"model loaded without use_safetensors=True at {offenders}"


@pytest.mark.parametrize("force_no_weights_only", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("torch_format", [True, False], ids=["torch_zip", "raw_pickle"])
def test_plain_from_pretrained_never_unpickles_code(tiny_model_dir, tmp_path, marker, monkeypatch, torch_format,
                                                      force_no_weights_only):
    """Without `use_safetensors`, transformers 5.24 does fall back to pytorch_model.bin, but always through
    `torch.load(weights_only=True)`, passed explicitly so torch's opt-out variable cannot turn it off."""
    from transformers import AutoModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    write_malicious_pickle(folder / "pytorch_model.bin", marker, torch_format)
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert not marker.exists()


def redirect_weights(folder: Path, filename: str) -> None:
    """`config.json`'s `transformers_weights` names the weights file; transformers accepts `adapter_model.bin`."""
    config = json.loads((folder / "config.json").read_text())
    config["transformers_weights"] = filename
    (folder / "config.json").write_text(json.dumps(config))


def test_config_redirect_to_a_malicious_pickle_does_not_run_it(tiny_model_dir, tmp_path, marker):
    from transformers import AutoModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    redirect_weights(folder, "adapter_model.bin")
    write_malicious_pickle(folder / "adapter_model.bin", marker)
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        AutoModel.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    assert not marker.exists()


def test_scripts_refuse_a_config_redirect_to_a_pickle(tiny_model_dir, tmp_path):
    """A tensors-only pickle cannot run code, but the scripts must still read no pickle at all, e.g. when the weights
    and config come from an unreviewed revision. transformers itself follows `transformers_weights` to the pickle."""
    from safetensors.torch import load_file

    from polyp_segmentation.loading import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "adapter_model.bin")
    redirect_weights(folder, "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin"):
        load_model(folder)


# --------------------------------------------------------------------------------------------------------------------
# Accelerate's load_state on resume


@contextlib.contextmanager
def global_rng_kept():
    """`load_state` sets the global RNGs from the checkpoint: give the other tests theirs back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@pytest.fixture(scope="module")
def resumable_run(tmp_path_factory):
    """A genuine checkpoint of the tiny model, written in this process with train_accelerate.py's own builders, and
    the prepared Accelerator to resume into with the script's `load_checkpoint`."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import get_scheduler

    import train_accelerate
    from polyp_segmentation.checkpoints import TRAINING_STATE_FILE
    from polyp_segmentation.training import build_optimizer

    output_dir = tmp_path_factory.mktemp("resumable")
    args = train_accelerate.parse_args([
        "--output_dir", str(output_dir), "--config_overrides", TINY_CONFIG_OVERRIDES, "--resolution", "64",
        "--per_device_train_batch_size", "4", "--max_train_steps", "1", "--mixed_precision", "no",
        "--report_to", "none",
    ])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        with global_rng_kept():
            accelerator = train_accelerate.build_accelerator(args)
            config, _ = train_accelerate.load_config_and_processor(args)
            model = train_accelerate.build_model(config, args)
            optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
            scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=0,
                                      num_training_steps=1)
            accelerator.prepare(model, optimizer, scheduler)
            checkpoint = output_dir / "checkpoints" / "checkpoint-1"
            accelerator.save_state(str(checkpoint))  # what train_accelerate.save_checkpoint writes, plus its state file
            (checkpoint / TRAINING_STATE_FILE).write_text(json.dumps(
                {"epoch": 1, "step_in_epoch": 0, "completed_steps": 1, "best_dice": 0.0, "best_epoch": 1}))
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                "training_state.json"} <= {p.name for p in checkpoint.iterdir()}
        yield train_accelerate, accelerator, args, checkpoint
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def planted_checkpoint(checkpoint: Path, folder: Path, filename: str, marker: Path) -> Path:
    shutil.copytree(checkpoint, folder)
    if filename == "pytorch_model.bin":  # without model.safetensors accelerate falls back to the pickle
        (folder / "model.safetensors").unlink()
    write_malicious_pickle(folder / filename, marker)
    return folder


def resume_in_process(resumable_run, checkpoint: Path):
    from polyp_segmentation.checkpoints import load_checkpoint

    _, accelerator, args, _ = resumable_run
    with global_rng_kept():
        return load_checkpoint(accelerator, argparse.Namespace(
            **{**vars(args), "resume_from_checkpoint": str(checkpoint)}), model_ema=None)


def test_resume_from_the_genuine_checkpoint_works(resumable_run):
    assert resume_in_process(resumable_run, resumable_run[3])["completed_steps"] == 1


@pytest.mark.parametrize(
    ("filename", "error"),
    [
        ("optimizer.bin", pickle.UnpicklingError),
        ("scheduler.bin", pickle.UnpicklingError),
        ("pytorch_model.bin", pickle.UnpicklingError),
        # Never unpickled: the count of custom_checkpoint_*.pkl must match the (zero) registered objects.
        ("custom_checkpoint_0.pkl", RuntimeError),
        # accelerate itself only logs a failed load ("Could not load random states"); load_checkpoint refuses it.
        ("random_states_0.pkl", ValueError),
    ],
)
def test_resume_never_unpickles_code(resumable_run, tmp_path, marker, filename, error):
    """Every file `accelerate.load_state` reads on this (single-process, CPU, no FSDP/DeepSpeed) resume goes through
    `accelerate.utils.load`, which passes `weights_only=True` explicitly."""
    checkpoint = planted_checkpoint(resumable_run[3], tmp_path / "checkpoint", filename, marker)
    with pytest.raises(error) if error else contextlib.suppress(ValueError):
        resume_in_process(resumable_run, checkpoint)
    assert not marker.exists()


def test_resume_stops_on_a_tampered_random_state_file(resumable_run, tmp_path, marker):
    checkpoint = planted_checkpoint(resumable_run[3], tmp_path / "checkpoint", "random_states_0.pkl", marker)
    with pytest.raises(Exception, match="random_states_0.pkl"):
        resume_in_process(resumable_run, checkpoint)


def test_train_accelerate_resume_with_a_malicious_optimizer_state_fails_without_running_it(
        resumable_run, kvasir_root, tmp_path, marker):
    checkpoint = planted_checkpoint(resumable_run[3], tmp_path / "checkpoint", "optimizer.bin", marker)
    command = [
        sys.executable, str(REPO_ROOT / "train_accelerate.py"), "--dataset_name", str(kvasir_root),
        "--output_dir", str(tmp_path / "run"), "--config_overrides", TINY_CONFIG_OVERRIDES, "--resolution", "64",
        "--max_train_samples", "4", "--max_eval_samples", "2", "--per_device_train_batch_size", "4",
        "--max_train_steps", "1", "--mixed_precision", "no", "--report_to", "none",
        "--resume_from_checkpoint", str(checkpoint),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode != 0, completed.stderr[-3000:]
    assert "Weights only load failed" in completed.stderr, completed.stderr[-3000:]
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# The remote code: imports and import-time side effects

# Their own dependencies: numpy, PIL and huggingface_hub, and safetensors (a hard requirement of transformers and timm).
ALLOWED_PACKAGES = {"torch", "timm", "transformers", "numpy", "PIL", "huggingface_hub", "safetensors"}
SIBLINGS = {name.removesuffix(".py") for name in REMOTE_CODE_FILES}


@pytest.mark.parametrize("filename", REMOTE_CODE_FILES)
def test_remote_code_imports_only_allowed_packages(filename):
    tree = ast.parse((REPO_ROOT / filename).read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top_levels = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level != 1 or node.module not in SIBLINGS:
                    problems.append(f"line {node.lineno}: relative import {'.' * node.level}{node.module or ''}")
                continue
            top_levels = [node.module.split(".")[0]]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and (getattr(node.func, "id", None) or node.func.attr) in {"__import__", "import_module", "exec", "eval"}):
            problems.append(f"line {node.lineno}: dynamic import or exec")
            continue
        else:
            continue
        problems += [f"line {node.lineno}: imports {name}" for name in top_levels
                     if name not in ALLOWED_PACKAGES and name not in sys.stdlib_module_names]
    assert not problems, f"{filename}: {problems}"


CANARY = """
import os, socket
open(os.devnull).close()
try:
    socket.getaddrinfo("example.invalid", 443)
except OSError:
    pass
"""

IMPORT_PROBE = textwrap.dedent(r"""
    import ast, builtins, importlib, io, json, os, socket, sys
    package_parent, package, repo_copy, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    modules = [name[:-3] for name in json.loads(sys.argv[5])]
    package_dir = os.path.join(package_parent, package)

    # Everything the three files import, run first: what is left to observe is their own top-level code.
    import torch, timm, transformers
    for module in modules:
        for node in ast.parse(open(os.path.join(package_dir, module + ".py")).read()).body:
            if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and not node.level):
                exec(ast.unparse(node), {})

    sockets, opens, recording = [], [], False

    def refuse(kind):
        def refused(*args, **kwargs):
            sockets.append(kind)
            raise OSError(f"network access blocked by the test ({kind})")
        return refused

    socket.socket.connect = refuse("socket.connect")
    socket.socket.connect_ex = refuse("socket.connect_ex")
    socket.create_connection = refuse("socket.create_connection")
    socket.getaddrinfo = refuse("socket.getaddrinfo")

    def audit(event, args):  # also catches what the patches miss, e.g. sockets and files opened from C
        if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"):
            sockets.append(event)
        elif recording and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if not (path.endswith((".py", ".pyc")) and os.path.dirname(path).startswith(package_dir)):
                opens.append(f"audit open {path}")

    real_open, real_os_open = builtins.open, os.open

    def recorded_open(file, *args, **kwargs):
        if recording:
            opens.append(f"open {file}")
        return real_open(file, *args, **kwargs)

    def recorded_os_open(path, *args, **kwargs):
        if recording:
            opens.append(f"os.open {path}")
        return real_os_open(path, *args, **kwargs)

    sys.addaudithook(audit)
    builtins.open = io.open = recorded_open
    os.open = recorded_os_open
    sys.path.insert(0, package_parent)

    def observe(module):
        global recording
        del sockets[:], opens[:]
        recording = True
        importlib.import_module(f"{package}.{module}")
        recording = False
        return list(sockets), list(opens)

    report = {"imports": {module: observe(module) for module in modules}, "canary": observe("canary")}

    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    del sockets[:]
    config = AutoConfig.from_pretrained(repo_copy, trust_remote_code=True, **overrides)
    model = AutoModel.from_config(config, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(repo_copy, trust_remote_code=True)
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(1, 3, 40, 30)).logits
    report.update(load_sockets=list(sockets), logits_shape=list(logits.shape), model_class=type(model).__name__,
                  processor_class=type(processor).__name__)
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def import_probe(tmp_path_factory) -> dict:
    """Imports the three files as a package, then builds config, model and processor through the Auto classes, all
    in a fresh interpreter with the network blocked; returns what it saw."""
    root = tmp_path_factory.mktemp("import_probe")
    package = root / "packages" / "attention_unet_remote"
    repo_copy = root / "repo"
    package.mkdir(parents=True)
    repo_copy.mkdir()
    (package / "__init__.py").write_text("")
    (package / "canary.py").write_text(CANARY)  # does I/O at import: proves the probe sees it
    for name in (*REMOTE_CODE_FILES, "config.json", "preprocessor_config.json"):
        shutil.copy(REPO_ROOT / name, repo_copy / name)
        if name.endswith(".py"):
            shutil.copy(REPO_ROOT / name, package / name)
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    completed = subprocess.run(
        [sys.executable, "-B", "-c", IMPORT_PROBE, str(package.parent), package.name, str(repo_copy),
         json.dumps(TINY_OVERRIDES), json.dumps(REMOTE_CODE_FILES)],
        capture_output=True, text=True, env=env, cwd=root,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_remote_code_import_opens_no_file_and_no_socket(import_probe):
    sockets, opens = import_probe["canary"]
    assert "socket.getaddrinfo" in sockets and any(os.devnull in entry for entry in opens), import_probe["canary"]
    for module, (sockets, opens) in import_probe["imports"].items():
        assert sockets == [] and opens == [], f"importing {module}: sockets {sockets}, files {opens}"


def test_auto_config_and_model_from_config_need_no_network(import_probe):
    assert import_probe["load_sockets"] == []
    assert import_probe["model_class"] == "AttentionUNetForSemanticSegmentation"
    assert import_probe["logits_shape"] == [1, 1, 40, 30]
    assert import_probe["processor_class"] == "AttentionUNetImageProcessor"


# --------------------------------------------------------------------------------------------------------------------
# Damaged model.safetensors


def damaged_copy(tiny_model_dir: Path, folder: Path, damage: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return weights
    tensors = load_file(weights)
    if damage == "wrong_shape":
        tensors[DECODER_TENSOR] = torch.zeros(5, *tensors[DECODER_TENSOR].shape[1:])
    elif damage == "missing_tensor":
        del tensors[DECODER_TENSOR]
    else:  # an extra tensor: weights of another architecture than the config builds (transformers only warns)
        tensors[UNEXPECTED_TENSOR] = torch.zeros(3)
    save_file(tensors, weights, metadata={"format": "pt"})
    return weights


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "missing_tensor", "unexpected_tensor"])
def test_damaged_weights_never_load(tiny_model_dir, tmp_path, damage):
    """Plain `from_pretrained` as users call it: transformers fails on a truncated file and a wrong-shaped tensor; the
    model's own `from_pretrained` makes missing and left-over tensors an error naming the folder, where transformers
    would only log them."""
    from transformers import AutoModel

    folder = damaged_copy(tiny_model_dir, tmp_path / "model", damage).parent
    with pytest.raises(Exception) as caught:
        AutoModel.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    if damage in ("missing_tensor", "unexpected_tensor"):
        assert str(folder) in str(caught.value)
        assert (DECODER_TENSOR if damage == "missing_tensor" else UNEXPECTED_TENSOR) in str(caught.value)


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "missing_tensor", "unexpected_tensor"])
def test_scripts_name_the_damaged_file_and_tensor(tiny_model_dir, tmp_path, damage):
    from polyp_segmentation.loading import load_model

    weights = damaged_copy(tiny_model_dir, tmp_path / "model", damage)
    with pytest.raises(ValueError) as caught:
        load_model(weights.parent)
    message = str(caught.value)
    # A file's content is judged before transformers reads it (the file named); which tensors the set lacks or has
    # too many of, by the model's from_pretrained, which knows the whole set (the folder named).
    assert str(weights if damage in ("truncated", "wrong_shape") else weights.parent) in message
    if damage in ("wrong_shape", "missing_tensor"):
        assert DECODER_TENSOR in message
    if damage == "unexpected_tensor":
        assert UNEXPECTED_TENSOR in message
    if damage == "wrong_shape":
        assert "[5, " in message and "[16, " in message
