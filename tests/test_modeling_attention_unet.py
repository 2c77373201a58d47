"""The model and its config: shapes, loss, gates, initialisation, save/load, Auto classes and the pipeline."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from polyp_segmentation.testing import DECODER_VARIANTS, REPO_ROOT, TINY_OVERRIDES, make_config, make_model


@pytest.fixture(scope="module", params=list(DECODER_VARIANTS))
def tiny_model(request):
    return make_model(**TINY_OVERRIDES, **DECODER_VARIANTS[request.param])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"decoder_channels": []}, "decoder_channels"),
        ({"decoder_channels": [32, -16, 16, 8, 8]}, "decoder_channels"),
        ({"loss_alpha": 1.5}, "loss_alpha"),
        ({"loss_alpha": -0.1}, "loss_alpha"),
        ({"encoder_name": "not_a_timm_model"}, "encoder_name"),
        ({"threshold": 1.0}, "threshold"),
        ({"num_channels": 0}, "num_channels"),
        ({"attention_channels_ratio": 0.0}, "attention_channels_ratio"),
        ({"decoder_upsampling": "bicubic"}, "decoder_upsampling"),
        ({"auxiliary_loss_weight": -0.5}, "auxiliary_loss_weight"),
    ],
)
def test_config_rejects_invalid_field_by_name(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_config(**overrides)


def test_decoder_stage_count_must_match_encoder_stride():
    with pytest.raises(ValueError, match="decoder_channels.*total stride of 32.*5 stages"):
        make_model(encoder_name="convnext_atto", decoder_channels=[16, 8])


def test_config_defaults_are_the_documented_ones():
    config = make_config()
    assert config.encoder_name == "convnext_tiny"
    assert config.use_attention_gates and config.num_channels == 3
    assert config.num_output_channels == 1 and config.loss_alpha == 0.5 and config.threshold == 0.5
    assert config.id2label == {0: "background", 1: "polyp"}


@pytest.mark.parametrize(("height", "width"), [(256, 256), (200, 300), (33, 47), (9, 17)])
def test_logits_match_input_size(tiny_model, height, width):
    with torch.no_grad():
        logits = tiny_model(torch.rand(2, 3, height, width)).logits
    assert logits.shape == (2, 1, height, width)


def test_default_convnext_tiny_forward_and_attention_maps():
    model = make_model()
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 64, 96), output_attentions=True)
    assert outputs.logits.shape == (1, 1, 64, 96)
    # ConvNeXt's features sit at strides 4, 8, 16, 32: one gate on each of the three skips.
    assert [tuple(a.shape) for a in outputs.attentions] == [(1, 1, 4, 6), (1, 1, 8, 12), (1, 1, 16, 24)]


def test_attention_maps_one_per_skip_in_unit_interval(tiny_model):
    with torch.no_grad():
        outputs = tiny_model(torch.rand(2, 3, 100, 60), output_attentions=True)
    strides = [16, 8, 4]
    assert len(outputs.attentions) == len(strides)
    for coefficients, stride in zip(outputs.attentions, strides):
        assert coefficients.shape == (2, 1, -(-100 // stride), -(-60 // stride))
        assert coefficients.min() >= 0 and coefficients.max() <= 1
    assert tiny_model(torch.rand(1, 3, 64, 64)).attentions is None


def test_every_skip_of_a_stride_2_encoder_is_gated():
    model = make_model(encoder_name="resnet18", decoder_channels=[32, 16, 16, 8, 8])
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 64, 64), output_attentions=True)
    assert [a.shape[-1] for a in outputs.attentions] == [4, 8, 16, 32]


def test_rejects_wrong_rank_and_channel_count(tiny_model):
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\), got \(3, 64, 64\)"):
        tiny_model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"got \(1, 4, 64, 64\)"):
        tiny_model(torch.rand(1, 4, 64, 64))


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> float:
    """BCE + soft Dice (smooth 1, per image, averaged), written out element by element."""
    p = torch.sigmoid(logits.double())
    y = labels.double()
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    dices = []
    for i in range(len(p)):
        dices.append((2 * (p[i] * y[i]).sum() + 1) / (p[i].sum() + y[i].sum() + 1))
    return (alpha * bce + (1 - alpha) * (1 - torch.stack(dices).mean())).item()


@pytest.mark.parametrize("label_rank", [3, 4])
def test_loss_matches_reference(tiny_model, label_rank):
    torch.manual_seed(0)
    pixel_values = torch.rand(2, 3, 64, 64)
    labels = (torch.rand(2, 64, 64) > 0.7).float()
    with torch.no_grad():
        outputs = tiny_model(pixel_values, labels=labels if label_rank == 3 else labels[:, None])
    assert outputs.loss.item() == pytest.approx(reference_loss(outputs.logits, labels[:, None], 0.5), rel=1e-5)


def test_auxiliary_heads_add_their_mean_loss_and_change_no_output():
    """Deep supervision: a 1x1 head on each decoder stage but the last, upsampled to the input, in the loss only."""
    torch.manual_seed(0)
    pixel_values, labels = torch.rand(2, 3, 70, 50), (torch.rand(2, 70, 50) > 0.7).float()
    plain = make_model(**TINY_OVERRIDES)
    supervised = make_model(**TINY_OVERRIDES, use_auxiliary_heads=True, auxiliary_loss_weight=0.3)
    supervised.load_state_dict(plain.state_dict(), strict=False)
    stages = []
    hooks = [block.register_forward_hook(lambda module, args, output: stages.append(output[0]))
             for block in supervised.decoder.blocks]
    with torch.no_grad():
        outputs = supervised(pixel_values, labels=labels, output_attentions=True)
        reference = plain(pixel_values, labels=labels, output_attentions=True)
    for hook in hooks:
        hook.remove()
    assert len(supervised.auxiliary_heads) == len(supervised.config.decoder_channels) - 1
    assert torch.equal(outputs.logits, reference.logits)
    assert all(torch.equal(a, b) for a, b in zip(outputs.attentions, reference.attentions))
    auxiliary = [reference_loss(torch.nn.functional.interpolate(head(stage), size=stages[-1].shape[-2:],
                                                                mode="bilinear")[..., :70, :50], labels[:, None], 0.5)
                 for head, stage in zip(supervised.auxiliary_heads, stages)]
    expected = reference.loss.item() + 0.3 * float(np.mean(auxiliary))
    assert outputs.loss.item() == pytest.approx(expected, rel=1e-5)
    supervised(pixel_values, labels=labels).loss.backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in supervised.auxiliary_heads)


def test_weights_without_auxiliary_heads_load_into_a_model_with_them(tiny_model_dir):
    """Older checkpoints (the shipped one) fine-tune with deep supervision: the heads start from `_init_weights`."""
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(tiny_model_dir, trust_remote_code=True)
    supervised = AutoModel.from_pretrained(tiny_model_dir, trust_remote_code=True, use_auxiliary_heads=True)
    pixel_values = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(supervised(pixel_values).logits, plain(pixel_values).logits)
    for head in supervised.auxiliary_heads:
        assert torch.all(head.bias == 0) and head.weight.std() > 0


def test_labels_of_wrong_shape_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="labels"):
        tiny_model(torch.rand(1, 3, 64, 64), labels=torch.zeros(1, 32, 32))


def test_loss_is_float32_under_bf16_autocast(tiny_model):
    pixel_values = torch.rand(2, 3, 64, 64)
    labels = (torch.rand(2, 64, 64) > 0.5).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = tiny_model(pixel_values, labels=labels)
    assert outputs.logits.dtype == torch.bfloat16
    assert outputs.loss.dtype == torch.float32
    expected = reference_loss(outputs.logits.float(), labels[:, None], 0.5)
    assert outputs.loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("decoder", list(DECODER_VARIANTS))
def test_gradients_reach_every_gate(decoder):
    model = make_model(**TINY_OVERRIDES, **DECODER_VARIANTS[decoder]).train()
    pixel_values, labels = torch.rand(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.5).float()
    # `psi` starts at zero, so the gates' projections receive gradients from the second step on.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(pixel_values, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model(pixel_values, labels=labels).loss.backward()
    gates = [block.attention_gate for block in model.decoder.blocks if block.attention_gate is not None]
    assert len(gates) == 3
    for gate in gates:
        for name, parameter in gate.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    """Through whichever switch this transformers has (`activation_checkpointing_enable` since 5.x); the timm
    encoder's own stages follow it."""

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        model = make_model(seed=1, **TINY_OVERRIDES).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        torch.manual_seed(2)
        model(torch.rand(2, 3, 64, 64), labels=(torch.rand(2, 64, 64) > 0.5).float()).loss.backward()
        assert model.encoder.grad_checkpointing == checkpointing  # timm's feature wrapper checkpoints each stage
        return [p.grad.clone() for p in model.parameters()]

    for plain, checkpointed in zip(gradients(False), gradients(True)):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-4, atol=1e-6)


def test_construction_time_init_leaves_encoder_weights_alone(monkeypatch):
    """Fill the encoder timm builds with a constant, build the model, and find the constant intact."""
    model = make_model(**TINY_OVERRIDES)
    modeling = sys.modules[type(model).__module__]
    create_model = modeling.timm.create_model

    def filled_encoder(*args, **kwargs):
        encoder = create_model(*args, **kwargs)
        with torch.no_grad():
            for tensor in encoder.state_dict().values():
                if tensor.is_floating_point():
                    tensor.fill_(0.125)
        return encoder

    monkeypatch.setattr(modeling.timm, "create_model", filled_encoder)
    rebuilt = make_model(**TINY_OVERRIDES)
    encoder_state = rebuilt.encoder.state_dict()
    assert any("norm" in name for name in encoder_state)  # LayerNorms are among what must survive
    for name, tensor in encoder_state.items():
        if tensor.is_floating_point():
            assert torch.all(tensor == 0.125), name
    # ... while the decoder was initialised.
    assert not torch.all(rebuilt.decoder.blocks[0].conv1.conv.weight == 0.125)


@pytest.mark.parametrize("decoder", list(DECODER_VARIANTS))
def test_auto_classes_with_remote_code_apply_the_decoder_init(decoder):
    """transformers skips `_init_weights` for modules without tensors of their own under `trust_remote_code`: the
    rules must reach every decoder leaf when the model is built as users and the training script build it."""
    model = make_model(**DECODER_VARIANTS[decoder])
    for block in model.decoder.blocks:
        for layer in (block.conv1, block.conv2):
            conv = layer.conv
            kaiming_fan_out_std = (2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5
            assert conv.weight.std().item() == pytest.approx(kaiming_fan_out_std, rel=0.1)
            assert torch.all(layer.norm.weight == 1) and torch.all(layer.norm.bias == 0)
        if block.upsample is not None:
            assert torch.all(block.upsample.bias == 0)
        if block.attention_gate is not None:
            # Gates start open and uniform: every coefficient is sigmoid(3).
            assert torch.all(block.attention_gate.gating_proj.bias == 0)
            assert block.attention_gate.psi.bias.item() == 3.0 and torch.all(block.attention_gate.psi.weight == 0)
    assert torch.all(model.segmentation_head.bias == 0)


def test_nearest_decoder_upsamples_the_whole_coarse_feature():
    model = make_model(**TINY_OVERRIDES, decoder_upsampling="nearest")
    first = model.decoder.blocks[0]
    assert first.upsample is None
    # convnext_atto's last stage has 320 channels and its stride-16 skip 160; the stage outputs 32.
    assert first.conv1.conv.in_channels == 320 + 160
    v1 = make_model(**TINY_OVERRIDES, decoder_upsampling="transposed_conv").decoder.blocks[0]
    assert v1.conv1.conv.in_channels == 32 + 160


def test_save_and_reload_in_a_fresh_process_gives_identical_logits(tiny_model_dir, tmp_path):
    copy = tmp_path / "copied_repo"
    shutil.copytree(tiny_model_dir, copy)
    torch.manual_seed(3)
    pixel_values = torch.rand(1, 3, 70, 90)
    np.save(tmp_path / "input.npy", pixel_values.numpy())
    script = f"""
import numpy as np, torch
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation
config = AutoConfig.from_pretrained({str(copy)!r}, trust_remote_code=True)
assert type(config).__name__ == "AttentionUNetConfig"
model = AutoModel.from_pretrained({str(copy)!r}, trust_remote_code=True).eval()
same = AutoModelForSemanticSegmentation.from_pretrained({str(copy)!r}, trust_remote_code=True).eval()
x = torch.from_numpy(np.load({str(tmp_path / 'input.npy')!r}))
with torch.no_grad():
    logits = model(x).logits
    assert torch.equal(logits, same(x).logits)
np.save({str(tmp_path / 'output.npy')!r}, logits.numpy())
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = model(pixel_values).logits.numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "output.npy"), expected)


def test_save_pretrained_writes_config_weights_and_code(tiny_model_dir):
    names = {path.name for path in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_attention_unet.py",
            "modeling_attention_unet.py", "image_processing_attention_unet.py"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_attention_unet.AttentionUNetForSemanticSegmentation"


def test_root_config_files_carry_the_auto_map():
    config = json.loads((REPO_ROOT / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSemanticSegmentation"}
    processor = json.loads((REPO_ROOT / "preprocessor_config.json").read_text())
    assert processor["auto_map"]["AutoImageProcessor"].endswith("AttentionUNetImageProcessor")


def test_pipeline_segments_a_real_image_at_its_original_size(tiny_model_dir, kvasir_root, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, copy)
    image_path = sorted((kvasir_root / "images").glob("*.jpg"))[0]
    script = f"""
import json, PIL.Image
from transformers import pipeline
segmenter = pipeline("image-segmentation", model={str(copy)!r}, trust_remote_code=True)
image = PIL.Image.open({str(image_path)!r})
result = segmenter(image)
print(json.dumps({{"size": list(image.size), "segments": [[r["label"], list(r["mask"].size)] for r in result]}}))
"""
    completed = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "is not supported for image-segmentation" not in completed.stderr
    assert result["segments"], "the pipeline returned no segment"
    for label, size in result["segments"]:
        assert label in {"background", "polyp"}
        assert size == result["size"]


@pytest.mark.parametrize(
    ("encoder_name", "input_side"),
    [("test_resnet", 64), ("test_mambaout", 64), ("test_coatnet", 160)],
    ids=["stride-2 CNN", "channels-last (NHWC) features", "non-persistent buffers"],
)
def test_other_timm_encoders_train_save_and_load(encoder_name, input_side, tmp_path):
    """A ResNet (a stride-2 skip), an encoder whose features come channels-last, and one whose relative-position
    indices are non-persistent buffers (which transformers re-creates empty on loading: timm's values must return)."""
    from transformers import AutoModel

    model = make_model(encoder_name=encoder_name, decoder_channels=[32, 16, 16, 8, 8])
    pixel_values = torch.rand(2, 3, input_side, input_side)
    labels = (torch.rand(2, input_side, input_side) > 0.5).float()
    model.train()
    outputs = model(pixel_values, labels=labels, output_attentions=True)
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss) and outputs.logits.shape == (2, 1, input_side, input_side)
    assert len(outputs.attentions) == len(model.decoder.skip_strides) - model.decoder.skip_strides.count(None)
    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


def test_shipped_weights_load_for_one_channel_input_with_every_tensor_initialised():
    """`num_channels=1, ignore_mismatched_sizes=True`: transformers re-creates the stem convolution empty and does not
    initialise it (the encoder is timm's); it must come out with timm's init, and the rest as shipped."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = AutoModel.from_pretrained(REPO_ROOT, trust_remote_code=True, num_channels=1, image_mean=[0.449],
                                      image_std=[0.226], ignore_mismatched_sizes=True).eval()
    shipped = load_file(REPO_ROOT / "model.safetensors")
    state = model.state_dict()
    recreated = [name for name, tensor in state.items() if tensor.shape != shipped[name].shape]
    assert recreated == ["encoder.stem_0.weight"]
    stem = state["encoder.stem_0.weight"]
    assert torch.isfinite(stem).all() and stem.std().item() == pytest.approx(0.02, rel=0.2)  # timm's trunc_normal_
    assert all(torch.equal(tensor, shipped[name]) for name, tensor in state.items() if name not in recreated)
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 1, 64, 64)).logits).all()


def test_more_than_one_output_channel_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="num_output_channels.*must be 1"):
        make_config(num_output_channels=2)


def test_older_transformers_fails_at_import_with_the_version_needed(monkeypatch):
    import importlib.util

    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.56.2")
    spec = importlib.util.spec_from_file_location("old_config", REPO_ROOT / "configuration_attention_unet.py")
    with pytest.raises(ImportError, match=r"transformers >= 4\.57.*4\.56\.2"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
