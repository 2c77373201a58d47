"""Markdown renderings of the project's measurements (benchmark and probe results), which make_model_card.py writes
into the docs and the benchmarks print."""

import json


def render_performance(report: dict) -> str:
    """The results as a Markdown table, followed by what was measured and on which machine."""
    settings, cpu = report["settings"], report["machine"]
    res, batch, threads = settings["resolution"], settings["batch_size"], settings["threads"]
    lines = [
        f"| Model | Mode | Latency, batch 1 (ms) | x ours eager | Throughput, batch {batch} (img/s) | x ours eager "
        "| GFLOP/s (% of peak) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    achieved = lambda figures: f"{figures['gflops_per_second']:.1f}" + (  # noqa: E731
        f" ({figures['fraction_of_peak']:.0%})" if "fraction_of_peak" in figures else
        f" ({figures['fraction_of_int8_peak']:.0%} of int8 peak)" if "fraction_of_int8_peak" in figures else "")
    ratio = lambda value: "–" if value is None else f"{value:.2f}"  # noqa: E731
    for result in report["results"]:
        name = result["model"]
        for variant, figures in result["variants"].items():
            if "error" in figures:
                lines.append(f"| {name} | {variant} | failed: {figures['error'][:100]} | | | | |")
                continue
            lines.append(f"| {name} | {variant} | {figures['latency_ms']:.1f} | "
                         f"{ratio(figures.get('latency_vs_ours_eager'))} | {figures['throughput']:.1f} | "
                         f"{ratio(figures.get('throughput_vs_ours_eager'))} | {achieved(figures)} |")
        trainings = {"training": result.get("training"),
                     **{f"training, {v}": f for v, f in result.get("training_variants", {}).items()}}
        for mode, training in trainings.items():
            if training is None:
                continue
            if "error" in training:
                lines.append(f"| {name} | {mode} | failed: {training['error'][:100]} | | | | |")
                continue
            lines.append(f"| {name} | {mode} | – | – | {training['throughput']:.1f} | "
                         f"{ratio(training.get('throughput_vs_ours_training'))} | {achieved(training)} |")

    mode_notes = {
        "channels_last": "*channels_last*: eager in channels-last memory format",
        "channels_last_medium": "*channels_last_medium*: the same with `torch.set_float32_matmul_precision(\"medium\")`"
                                " (`--channels_last --float32_matmul_precision medium` of predict.py and evaluate_model.py;"
                                " on CPUs without AMX the products stay float32, sent to oneDNN instead of MKL)",
        "compile": f"*compile*: `torch.compile` with backend `{settings['compile_backend']}`, static shapes",
        "onnxruntime": "*onnxruntime*: the `export_onnx.py` export (dynamic batch, height and width) on ONNX Runtime's "
                       "CPU execution provider",
        "openvino": "*openvino*: the same export read by OpenVINO (CPU plugin, compiled per input shape, latency hint)",
        "openvino_int8": "*openvino_int8*: that model quantized to int8 by NNCF as `export_openvino.py` does (this "
                         "model's encoder stem left in float32), calibrated on the benchmark's inputs",
        "pytorch_int8": "*pytorch_int8*: PyTorch's own x86 int8 path: `torch.export`, torchao's PT2E quantization "
                        "with `X86InductorQuantizer` (static, per-channel weights; calibrated on the benchmark's "
                        f"inputs) and `torch.compile` (backend `{settings['compile_backend']}`, freezing on)",
        "training": f"*training*: forward, backward and AdamW step at batch {batch}, BCE + Dice loss (*, "
                    "channels_last*: in channels-last memory format; *, channels_last_compile*: also with the forward "
                    "compiled, as `train_accelerate.py --channels_last --torch_compile`)",
    }
    measured = {variant for result in report["results"] for variant in result["variants"]}
    measured |= {"training"} if any("training" in result for result in report["results"]) else set()
    models = "; ".join(
        f"{r['model']}: {r['description']}, {r['params_m']:.1f} M parameters, {r['flops_per_image'] / 1e9:.2f} GFLOPs "
        "per image" + (f" ({r['train_flops_per_image'] / 1e9:.2f} per training image, taken as 3x the forward)"
                       if "train_flops_per_image" in r else "")
        for r in report["results"])
    notes = [
        f"{res}x{res} random fp32 inputs, the same for every model; {threads} thread(s) for PyTorch and ONNX Runtime; "
        f"medians of {settings['repeats']} runs after {settings['warmup']} warm-up runs. Ratios are to this model's "
        "eager figure (training: to its training figure); latency ratios below 1 and throughput ratios above 1 are "
        "faster. " + "; ".join(text for mode, text in mode_notes.items() if mode in measured) + ".",
        f"Models: {models}. FLOPs from `torch.utils.flop_counter.FlopCounterMode`, a multiply-add "
        "counted as 2; GFLOP/s is FLOPs per image x images/s (batch {batch} figure).".replace("{batch}", str(batch)),
        f"Machine: {cpu['model_name']}, {cpu['available_cpus']} CPU(s); torch {report['versions']['torch']}, "
        f"onnxruntime {report['versions'].get('onnxruntime', '–')}.",
    ]
    if cpu["peak_gflops"]:
        notes.append(f"fp32 peak of {threads} core(s): {threads} x {cpu['ghz']:.2f} GHz ({cpu['clock_source']}) x "
                     f"{cpu['fp32_flops_per_cycle_per_core']} FLOP/cycle = {cpu['peak_gflops']:.0f} GFLOP/s, with "
                     f"{cpu['derivation']}.")
    for result in report["results"]:
        if result.get("video"):
            video = result["video"]
            first = next(iter(video.values()))
            notes.append(f"End to end on a {first['size']} H.264 clip of {first['frames']} frames ({result['model']}; "
                         "predict.py's video path: decoding, the model, drawing and encoding overlapped): "
                         + "; ".join(f"{variant} {figures['frames_per_second']:.1f} frames/s"
                                     for variant, figures in video.items()) + ".")
    ours_variants = report["results"][0]["variants"]
    kernels = {variant: figures["convolution_kernels"] for variant, figures in ours_variants.items()
               if figures.get("convolution_kernels")}
    if kernels:
        notes.append("OpenVINO's kernels for this model's convolutions (the instruction set and precision its CPU "
                     "plugin chose): " + "; ".join(
                         f"{variant}: " + ", ".join(f"{name} x{count}" for name, count in sorted(used.items()))
                         for variant, used in kernels.items()) + ".")
    if cpu.get("isa_cap"):
        notes.append(f"Instruction sets capped with `ONEDNN_MAX_CPU_ISA={cpu['isa_cap']}` (and `OV_CPU_MAX_ISA`), "
                     "a stand-in for a CPU without them: oneDNN in PyTorch and OpenVINO dispatch as on such a CPU; "
                     "ONNX Runtime ignores the cap. The peaks are the capped ISA's.")
    if cpu.get("int8_peak_gops"):
        notes.append(f"int8 peak of {threads} core(s): {cpu['int8_peak_gops']:.0f} GOP/s ({cpu['int8_derivation']}).")
    interleaved = report["interleaved_eager_latency_ms"]
    ours = interleaved[report["results"][0]["model"]]
    notes.append(
        f"Eager batch-1 latency with the models taking turns run by run ({3 * settings['repeats']} runs each, medians; "
        "the fairest head-to-head on a noisy machine): "
        + "; ".join(f"{name} {ms:.1f} ms ({ms / ours:.2f} x ours)" for name, ms in interleaved.items()) + "."
    )
    notes.extend(f"Note: {note}" for note in report["notes"])
    notes.append(f"Measured with:\n\n```bash\n{report['command']}\n```")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def render_training_speed(result: dict) -> str:
    steps = result["step_alone"]
    baseline = steps[0]["frames_per_second"]
    lines = [f"| training step alone (batch {result['batch_size']}, {result['crop']}x{result['crop']} crops) | "
             f"frames/s | x {steps[0]['variant']} |", "|---|---:|---:|"]
    lines += [f"| {s['variant']} | {s['frames_per_second']:.2f} | {s['frames_per_second'] / baseline:.2f} |" for s in steps]
    lines += ["", "| float32 matrix product | matmul precision | GFLOP/s | relative error |", "|---|---|---:|---:|"]
    lines += [f"| {'x'.join(map(str, p['shape']))} | {p['float32_matmul_precision']} | {p['gflop_per_second']:.0f} | "
              f"{p['relative_error']:.1e} |" for p in result["matrix_products"]]
    return "\n".join(lines) + (
        f"\n\nThe input pipeline alone: {result['pipeline_frames_per_second_per_core']:.0f} frames/s on one core; with "
        f"the DataLoader feeding the step ({result['train_variant']}): {result['train_frames_per_second']:.2f} frames/s. "
        f"{result['device_name']} ({result['device']}, {result['cores']} cores), torch {result['torch']}; "
        f"measured with `{result['command']}`.")


def render_fit_probe(results: list[dict]) -> str:
    lines = ["| probe | model | config overrides | encoder | fit mean Dice | validation mean Dice |",
             "|---|---|---|---|---|---|"]
    for r in results:
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in r["config_overrides"].items()) or "-"
        validation = r.get("validation_mean_dice")
        lines.append(f"| {r.get('label') or '-'} | {r['model']} | {overrides} | "
                     f"{'from ' + r['init_encoder_from'] if r.get('init_encoder_from') else 'scratch'} | "
                     f"{r['fit_mean_dice']:.3f} | {'-' if validation is None else f'{validation:.3f}'} |")
    settings = sorted({(r["frames"], r["size"], r["steps"], r["batch_size"], r["learning_rate"]) for r in results})
    described = "; ".join(f"{f} training frames at {z}x{z}, {n} steps of batch {b}, lr {lr}" for f, z, n, b, lr in settings)
    return "\n".join(lines) + f"\n\n{described}; validation: the 60 validation frames at the same size. Each row is " \
        "one `python benchmarks/fit_probe.py --config_overrides '<JSON>' --eval_validation` run (`--seed 1` for the " \
        "rows labelled so, `--init_encoder_from <folder>` for an encoder started from saved weights)."
