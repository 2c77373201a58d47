"""benchmarks/bench_cpu.py --tiny runs end to end, writes its JSON and prints the table make_model_card.py renders
into docs/performance.md (figures not asserted)."""

import json
import os
import platform
import subprocess
import sys

from polyp_segmentation.testing import REPO_ROOT


def run_bench(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "benchmarks/bench_cpu.py", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_tiny_benchmark_writes_json_and_prints_the_table(tmp_path):
    from polyp_segmentation.reports import render_performance

    output_json = tmp_path / "bench.json"
    # The exports (ONNX Runtime, OpenVINO) and the video figures are left out: exporting the three models would
    # triple the test's time; tests/test_onnx.py and the test below cover them. The `eager` backend checks that
    # torch.compile traces the models without Inductor's compiler.
    result = run_bench("--tiny", "--resolution", "32", "--batch_size", "2", "--repeats", "2", "--warmup", "1",
                       "--threads", "1", "--compile_backend", "eager", "--skip", "onnxruntime", "openvino",
                       "openvino_int8", "pytorch_int8", "video", "--output_json", output_json)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]

    report = json.loads(output_json.read_text())
    assert report["settings"]["tiny"] and report["settings"]["resolution"] == 32
    assert report["machine"]["fp32_flops_per_cycle_per_core"] > 0
    results = {entry["model"]: entry for entry in report["results"]}
    assert report["interleaved_eager_latency_ms"].keys() == results.keys()
    assert all(ms > 0 for ms in report["interleaved_eager_latency_ms"].values())
    ours = report["results"][0]
    assert ours["model"].startswith("Attention U-Net")
    assert ours["flops_per_image"] > 0
    installed = [name for name, module in (("smp Unet", "segmentation_models_pytorch"),
                                           ("MONAI AttentionUnet", "monai")) if _importable(module)]
    assert set(results) == {ours["model"], *installed}
    for entry in report["results"]:
        assert set(entry["variants"]) == {"eager", "channels_last", "channels_last_medium", "compile"}
        for variant, figures in entry["variants"].items():
            assert "error" not in figures, (entry["model"], variant, figures.get("error"))
            assert figures["latency_ms"] > 0 and figures["throughput"] > 0
            assert "throughput_vs_ours_eager" in figures and "gflops_per_second" in figures
        assert entry["training"]["throughput"] > 0
    assert set(ours["training_variants"]) == {"channels_last", "channels_last_compile"}
    for variant, figures in ours["training_variants"].items():
        assert "error" not in figures, (variant, figures.get("error"))
        assert figures["throughput"] > 0 and figures["throughput_vs_ours_training"] > 0
    assert ours["variants"]["eager"]["throughput_vs_ours_eager"] == 1.0

    table = render_performance(report)
    assert table in result.stdout
    assert "| Attention U-Net (ours) | eager |" in table
    assert "| Attention U-Net (ours) | training, channels_last_compile |" in table
    assert "python benchmarks/bench_cpu.py --tiny" in table


def test_tiny_benchmark_has_the_int8_rows_and_the_video_figures(tmp_path):
    from polyp_segmentation.reports import render_performance

    output_json = tmp_path / "bench.json"
    # PyTorch's int8 path runs where torchao is installed (requirements-bench.txt), compiled by the `eager` backend:
    # Inductor's C++ build of it is the full benchmark's.
    result = run_bench("--tiny", "--resolution", "32", "--batch_size", "2", "--repeats", "2", "--warmup", "1",
                       "--threads", "1", "--video_frames", "6", "--compile_backend", "eager", "--output_json",
                       output_json, "--skip", "smp", "monai", "channels_last", "channels_last_medium", "compile",
                       "onnxruntime", "training")
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]

    report = json.loads(output_json.read_text())
    assert report["machine"]["int8_ops_per_cycle_per_core"] >= 2 * report["machine"]["fp32_flops_per_cycle_per_core"]
    (ours,) = report["results"]
    has_torchao = _importable("torchao")
    assert set(ours["variants"]) == {"eager", "openvino", "openvino_int8", *(["pytorch_int8"] if has_torchao else [])}
    if not has_torchao:
        assert any("pytorch_int8 skipped: torchao is not installed" in note for note in report["notes"])
    for variant, figures in ours["variants"].items():
        assert "error" not in figures, (variant, figures.get("error"))
        assert figures["latency_ms"] > 0 and figures["throughput"] > 0
    # What OpenVINO ran: float32 kernels for the float32 model (never bf16, which the plugin would pick by itself on
    # CPUs that have it), int8 ones in the int8 model.
    float_kernels, int8_kernels = (ours["variants"][v]["convolution_kernels"] for v in ("openvino", "openvino_int8"))
    assert float_kernels and all(name.lower().endswith("f32") for name in float_kernels), float_kernels
    assert any(name.lower().endswith(("i8", "u8")) for name in int8_kernels), int8_kernels
    if report["machine"]["ghz"]:
        assert "fraction_of_int8_peak" in ours["variants"]["openvino_int8"]
        assert "fraction_of_peak" in ours["variants"]["openvino"]
    assert set(ours["video"]) == {"eager", "openvino", "openvino_int8"}
    for figures in ours["video"].values():
        assert figures["frames"] == 6 and figures["frames_per_second"] > 0
    table = render_performance(report)
    assert "| Attention U-Net (ours) | openvino_int8 |" in table and "of int8 peak" in table
    from make_model_card import render_cpu_speed

    line = render_cpu_speed(report)
    assert "OpenVINO int8" in line and "ONNX Runtime" not in line and "frames/s" in line


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_fit_probe_fits_a_few_real_frames_and_prints_its_figures(kvasir_root):
    overrides = json.dumps({"encoder_name": "convnext_atto", "decoder_channels": [32, 16, 16, 8, 8]})
    result = subprocess.run(
        [sys.executable, "benchmarks/fit_probe.py", "--dataset_name", str(kvasir_root), "--config_overrides", overrides,
         "--frames", "4", "--size", "64", "--steps", "3", "--batch_size", "2", "--eval_validation"],
        cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["steps"] == 3 and figures["frames"] == 4 and figures["config_overrides"] == json.loads(overrides)
    assert 0 <= figures["fit_mean_dice"] <= 1 and 0 <= figures["validation_mean_dice"] <= 1
    assert figures["final_batch_loss"] > 0


def test_tiny_training_benchmark_ends_with_its_json_summary(kvasir_root, tmp_path):
    output_json = tmp_path / "train.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--tiny", "--dataset_name", str(kvasir_root),
                             "--dataloader_num_workers", "1", "--output_json", str(output_json)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads(output_json.read_text())
    assert summary["device"] == "cpu"
    assert summary["device_name"] not in ("", platform.machine()), "the CPU is named by its model, not its architecture"
    assert summary["pipeline_frames_per_second_per_core"] > 0 and summary["train_frames_per_second"] > 0
    assert summary["pipeline_frames_per_second_on_device"] > 0
    assert [step["variant"] for step in summary["step_alone"]] == [
        "fp32", "fp32 channels-last", "fp32 channels-last, matmul precision medium"]
    assert [p["float32_matmul_precision"] for p in summary["matrix_products"]] == ["highest", "medium"]
    assert all(p["gflop_per_second"] > 0 and p["relative_error"] < 1e-2 for p in summary["matrix_products"])
    assert 0 < summary["step_share_of_time"] <= 1
    assert "| input pipeline, one core |" in result.stdout
