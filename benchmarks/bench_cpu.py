#!/usr/bin/env python
"""CPU benchmark of the Attention U-Net against two reference U-Nets, in one run, on the same inputs and threads.

    pip install -r requirements-bench.txt
    python benchmarks/bench_cpu.py --output_json benchmarks/cpu.json && python make_model_card.py
    python benchmarks/bench_cpu.py --tiny --repeats 3          # a smoke run on tiny models

For this model and its peers, segmentation_models_pytorch's `Unet("tu-convnext_tiny")` and MONAI's `AttentionUnet`
(random weights, one output class), it measures at `--resolution` (default 256x256):

* inference latency at batch 1 and throughput (images/s) at `--batch_size` (default 8), in fp32: eager PyTorch, eager
  in channels-last memory format (also with float32 matmul precision `medium`), `torch.compile`, and ONNX Runtime
  (CPU) on the export `export_onnx.py` makes;
* training throughput: forward, backward and an AdamW step at `--batch_size`, with this model's BCE + Dice loss; for
  this model also in channels-last memory format and channels-last with the forward compiled, as
  `train_accelerate.py --channels_last [--torch_compile]` trains;
* the FLOPs per image (`torch.utils.flop_counter.FlopCounterMode`; a multiply-add counts 2) and the GFLOP/s each figure
  achieves, next to the machine's fp32 peak as derived from /proc/cpuinfo.

Every figure is the median of `--repeats` timed runs after `--warmup` untimed ones (which include the compilation);
each is also given as a ratio to this model's eager figure (for training, to this model's training figure). Prints a
Markdown table and writes everything to `--output_json`; `make_model_card.py` renders `benchmarks/cpu.json` into
`docs/performance.md`.
"""

import argparse
import copy
import importlib.util
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from polyp_segmentation.cli import write_output_json
from polyp_segmentation.inference import segment_frames
from polyp_segmentation.loading import check_remote_code_arguments, load_model
from polyp_segmentation.onnx_export import DYNAMIC_AXES, export_model, export_to_onnx
from polyp_segmentation.quantization import FLOAT32_LAYERS, openvino_float32, quantize_onnx
from polyp_segmentation.reports import render_performance
from polyp_segmentation.runtimes import OpenVinoSegmenter
from polyp_segmentation.testing import REPO_ROOT, TINY_OVERRIDES
from polyp_segmentation.video import segment_video

VARIANTS = ("eager", "channels_last", "channels_last_medium", "compile", "onnxruntime", "openvino", "openvino_int8",
            "pytorch_int8")
INT8_VARIANTS = ("openvino_int8", "pytorch_int8")
# This model's training step in the forms `train_accelerate.py` offers (and the `--skip` names that leave each out);
# the peers train eagerly only.
TRAINING_VARIANTS = {"eager": (), "channels_last": ("channels_last",),
                     "channels_last_compile": ("channels_last", "compile")}
PEERS = ("smp", "monai")
EXAMPLES = REPO_ROOT / "examples"
VIDEO_RATE = 25
SKIPPABLE = (*PEERS, "channels_last", "channels_last_medium", "compile", "onnxruntime", "openvino", "openvino_int8",
             "pytorch_int8", "training", "video")
OURS = "Attention U-Net (ours)"
PEER_NAMES = {"smp": "smp Unet", "monai": "MONAI AttentionUnet"}
# The /proc/cpuinfo flags that each ONEDNN_MAX_CPU_ISA value leaves out (by prefix).
ISA_CAP_DROPS = {"AVX2": ("avx512", "avx_vnni", "amx"), "AVX2_VNNI": ("avx512", "amx"),
                 "AVX512_CORE": ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx"),
                 "AVX512_CORE_VNNI": ("avx512_bf16", "amx"), "AVX512_CORE_BF16": ("amx",)}
# The variables that cap the instruction sets (oneDNN, OpenVINO's own kernels, MKL): part of the recorded command.
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "OV_CPU_MAX_ISA", "MKL_ENABLE_INSTRUCTIONS")
# FMA units per core are not in /proc/cpuinfo; two is right for Intel cores since Haswell (most AVX-512 server parts)
# and AMD cores since Zen 2.
FMA_UNITS_PER_CORE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="A saved model folder or Hub id (default: the repository's config.json with random "
                             "weights, or the tiny config with --tiny).")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow a Hub --model, whose Python code (configuration, model) then runs here.")
    parser.add_argument("--resolution", type=int, default=None, help="Input side (default: 256, or 64 with --tiny).")
    parser.add_argument("--batch_size", type=int, default=8, help="Batch of the throughput and training figures.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed runs per figure (the median is reported).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed runs before each figure.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="Threads for PyTorch and ONNX Runtime (default: all cores available, %(default)s).")
    parser.add_argument("--tiny", action="store_true",
                        help="Tiny models (convnext_atto encoders, narrow decoders) at 64x64: a smoke run.")
    parser.add_argument("--skip", nargs="+", default=[], choices=SKIPPABLE,
                        help="Peers or variants to leave out (missing peers are skipped anyway).")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend (default: %(default)s; 'eager' only checks that it traces).")
    parser.add_argument("--video_frames", type=int, default=100,
                        help="Frames of the clip whose end-to-end video figures are measured (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    check_remote_code_arguments(parser, args.trust_remote_code, {"--model": args.model})
    args.resolution = args.resolution or (64 if args.tiny else 256)
    if min(args.batch_size, args.repeats, args.threads, args.resolution) < 1 or args.warmup < 0:
        parser.error("--batch_size, --repeats, --threads and --resolution must be positive, --warmup non-negative")
    return args


# ----------------------------------------------------------------------------------------------------------- machine


def cpu_info() -> dict:
    """Model name, clock, SIMD flags and the fp32 peak they imply, with how it was derived."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda name: re.findall(rf"^{name}\s*:\s*(.+)$", text, flags=re.MULTILINE)  # noqa: E731
    flags = set(field("flags")[0].split()) if field("flags") else set()
    # A cap on the instruction sets oneDNN (PyTorch's and OpenVINO's) dispatches to stands in for an older CPU; the
    # peaks are then the capped ISA's. ONNX Runtime does not read it.
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() or None
    flags -= {flag for flag in flags if any(flag.startswith(prefix) for prefix in ISA_CAP_DROPS.get(isa_cap, ()))}
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq.exists():
        ghz, clock_source = int(max_freq.read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    elif field("cpu MHz"):
        ghz, clock_source = max(float(mhz) for mhz in field("cpu MHz")) / 1e3, "'cpu MHz' in /proc/cpuinfo"
    else:
        ghz, clock_source = None, "unknown"
    if "avx512f" in flags:
        isa, lanes, fma = "AVX-512 + FMA", 16, 2
    elif "avx2" in flags and "fma" in flags:
        isa, lanes, fma = "AVX2 + FMA", 8, 2
    elif "avx" in flags:
        isa, lanes, fma = "AVX (no FMA)", 8, 1
    else:
        isa, lanes, fma = "SSE", 4, 1
    units = FMA_UNITS_PER_CORE if fma == 2 else 1
    flops_per_cycle = lanes * fma * units
    # int8: a VNNI dot product (vpdpbusd) does 4 multiply-adds per 32-bit lane where an FMA does one; without VNNI
    # the same takes two instructions (vpmaddubsw + vpmaddwd). AMX tiles are not counted (they would raise it ~8x).
    vnni = "avx512_vnni" if "avx512_vnni" in flags else "avx_vnni" if "avx_vnni" in flags else None
    int8_per_fp32 = 4 if vnni else 2
    return {
        "model_name": field("model name")[0] if field("model name") else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "available_cpus": len(os.sched_getaffinity(0)),
        "ghz": ghz,
        "clock_source": clock_source,
        "isa": isa,
        "isa_cap": isa_cap,
        "fp32_flops_per_cycle_per_core": flops_per_cycle,
        "derivation": (f"{lanes} fp32 lanes ({isa}) x {fma} FLOP per {'FMA' if fma == 2 else 'op'} x {units} "
                       f"{'FMA ' if fma == 2 else ''}unit(s) per core = {flops_per_cycle} FLOP/cycle/core"
                       + (" (2 FMA units per core is assumed: not in /proc/cpuinfo)" if fma == 2 else "")),
        "int8_ops_per_cycle_per_core": flops_per_cycle * int8_per_fp32,
        "int8_derivation": (f"{int8_per_fp32} x the fp32 FLOP/cycle: "
                            + (f"{vnni} dot products do 4 int8 multiply-adds per 32-bit lane" if vnni else
                               "no VNNI: int8 dot products take two instructions (vpmaddubsw + vpmaddwd)")
                            + ("; AMX present but not counted" if "amx_int8" in flags else "")),
    }


def peak_gflops(cpu: dict, cores: int, per_cycle: str = "fp32_flops_per_cycle_per_core") -> float | None:
    return None if cpu["ghz"] is None else cores * cpu["ghz"] * cpu[per_cycle]


# ------------------------------------------------------------------------------------------------------------ models


class LogitsOnly(nn.Module):
    """This model called like the peers: `pixel_values` -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def build_ours(args):
    from transformers import AutoConfig, AutoModel

    if args.model:
        model = load_model(args.model, trust_remote_code=args.trust_remote_code)
        source = args.model
    else:
        config = AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True, **(TINY_OVERRIDES if args.tiny else {}))
        model = AutoModel.from_config(config, trust_remote_code=True)
        source = f"config.json{' with the tiny overrides' if args.tiny else ''}, random weights"
    loss_fn = sys.modules[type(model).__module__].attention_unet_loss
    description = f"{source} (encoder {model.config.encoder_name}, decoder {model.config.decoder_channels})"
    return model, description, loss_fn


def build_smp(args):
    import segmentation_models_pytorch as smp

    if args.tiny:
        return smp.Unet("tu-convnext_atto", encoder_weights=None, classes=1, decoder_channels=(32, 16, 16, 8, 8)), \
            'smp.Unet("tu-convnext_atto", decoder_channels=(32, 16, 16, 8, 8)), random weights'
    return smp.Unet("tu-convnext_tiny", encoder_weights=None, classes=1), 'smp.Unet("tu-convnext_tiny"), random weights'


def build_monai(args):
    from monai.networks.nets import AttentionUnet

    channels = (4, 8, 16, 32, 64) if args.tiny else (16, 32, 64, 128, 256)
    model = AttentionUnet(spatial_dims=2, in_channels=3, out_channels=1, channels=channels, strides=(2, 2, 2, 2))
    return model, f"monai AttentionUnet(channels={channels}, strides=(2, 2, 2, 2)), random weights"


# ------------------------------------------------------------------------------------------------------------ timing


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, list[float], float]:
    """Median time of `fn()` over `repeats` runs after `warmup` runs; also all times and the warm-up's duration."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, warmup_seconds


def interleaved_latency_ms(modules: dict[str, nn.Module], single: torch.Tensor, warmup: int,
                           repeats: int) -> dict[str, float]:
    """Eager batch-1 median latency of each model, the models taking turns run by run, so that a drift of the machine
    (another process, the clock) weighs on all of them alike rather than on whichever was measured at that moment."""
    times = {name: [] for name in modules}
    with torch.inference_mode():
        for _ in range(warmup):
            for module in modules.values():
                module(single)
        for _ in range(repeats):
            for name, module in modules.items():
                start = time.perf_counter()
                module(single)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(runs) * 1e3 for name, runs in times.items()}


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def make_runner(variant: str, module: nn.Module, args, export: Callable[[str], object], workdir: Path,
                inputs: torch.Tensor, float32_layers: tuple[str, ...] = ()):
    """A `pixel_values -> logits` callable for one variant (its set-up time excluded from the figures)."""
    if variant == "eager":
        return lambda x: module(x)
    if variant in ("channels_last", "channels_last_medium"):
        converted = copy.deepcopy(module).to(memory_format=torch.channels_last)
        precision = "medium" if variant == "channels_last_medium" else torch.get_float32_matmul_precision()

        def run(x):
            # Set per call and restored, so that no other variant or peer runs under it.
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                return converted(x.contiguous(memory_format=torch.channels_last))
            finally:
                torch.set_float32_matmul_precision(previous)

        return run
    if variant == "compile":
        # Static shapes: one specialised graph per batch size, as a deployment with fixed batches would use.
        compiled = torch.compile(module, backend=args.compile_backend, dynamic=False)
        return lambda x: compiled(x)
    if variant == "onnxruntime":
        import onnxruntime as ort

        path = workdir / "model.onnx"
        export(str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(["logits"], {"pixel_values": x.numpy()})[0]
    if variant in ("openvino", "openvino_int8"):
        return openvino_runner(variant, args, export, workdir, inputs, float32_layers)
    if variant == "pytorch_int8":
        return pytorch_int8_runner(module, args, inputs)
    raise ValueError(variant)


def pytorch_int8_runner(module: nn.Module, args, inputs: torch.Tensor):
    """PyTorch's own x86 int8 path: the graph captured by `torch.export` (dynamic batch), quantized by torchao's PT2E
    flow with `X86InductorQuantizer` (static: per-channel int8 weights, int8 activations) calibrated on the benchmark's
    inputs, then compiled by Inductor with freezing, which folds the int8 weights into oneDNN's packed layout."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    batch = torch.export.Dim("batch", min=1, max=max(args.batch_size, 2))
    exported = torch.export.export(module, (inputs[:2],), dynamic_shapes=({0: batch},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(inputs)
    quantized = move_exported_model_to_eval(convert_pt2e(prepared))
    compiled = torch.compile(quantized, backend=args.compile_backend, dynamic=False)

    def run(x):
        # Inductor compiles on the first call of each shape, and freezing must be on then (as PyTorch's x86 int8
        # tutorial sets it; `torch.compile(options={"freezing": True})` leaves oneDNN's weight packing unlowered).
        with torch._inductor.config.patch(freezing=True):
            return compiled(x)

    return run


def openvino_runner(variant: str, args, export: Callable[[str], object], workdir: Path, inputs: torch.Tensor,
                    float32_layers: tuple[str, ...]):
    """The ONNX export run by OpenVINO (export_openvino.py's model), in float32 or quantized to int8 by NNCF with the
    benchmark's own inputs as calibration (speed does not depend on what calibrates; the int8 model's accuracy is
    evaluate_model.py's to measure)."""
    import openvino

    export(str(workdir / "model.onnx"))
    if variant == "openvino_int8":
        calibration = [frame[None].numpy() for frame in inputs]
        model = quantize_onnx(workdir / "model.onnx", calibration, {"precision": "int8"}, float32_layers)
    else:
        model = openvino_float32(workdir / "model.onnx", {"precision": "float32"})
    openvino.save_model(model, str(workdir / "model.xml"), compress_to_fp16=False)
    segmenter = OpenVinoSegmenter(workdir / "model.xml", config={"INFERENCE_NUM_THREADS": args.threads})

    def run(x):
        return segmenter(pixel_values=x).logits

    run.segmenter = segmenter  # for the video figures
    run.kernels = lambda: convolution_kernels(segmenter)
    return run


def convolution_kernels(segmenter: OpenVinoSegmenter) -> dict[str, int]:
    """How many convolutions of the compiled models run on each oneDNN kernel (`brgconv_avx512_core_vnni_I8`,
    `jit_avx2_f32`...): the instruction set and precision the plugin actually chose."""
    counts = Counter()
    for compiled in segmenter.compiled_models.values():
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                counts[info["primitiveType"].astype(str)] += 1
    return dict(counts)


def video_frames_per_second(segmenter, args, workdir: Path) -> dict:
    """predict.py's video path end to end (decode, segment, draw, encode H.264) on a clip of the examples/ frames at
    `--resolution`, with `segmenter` (the PyTorch model or an export called like it)."""
    import av
    import PIL.Image
    from transformers import AutoImageProcessor

    clip = workdir / "clip.mp4"
    if not clip.exists():
        side = args.resolution + args.resolution % 2
        frames = [PIL.Image.open(path).convert("RGB").resize((side, side)) for path in sorted(EXAMPLES.glob("*.jpg"))]
        with av.open(str(clip), "w") as container:
            stream = container.add_stream("libx264", rate=VIDEO_RATE)
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            for index in range(args.video_frames):
                frame = av.VideoFrame.from_image(frames[index % len(frames)])
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    processor = AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    summary = segment_video(lambda frames: segment_frames(segmenter, processor, frames, 0.5), clip,
                            workdir / "overlay.mp4", workdir / "frames.csv", batch_size=args.batch_size)
    return {"frames": summary.frames, "seconds": summary.seconds, "frames_per_second": summary.frames / summary.seconds,
            "size": f"{summary.width}x{summary.height}"}


def benchmark_model(name: str, model: nn.Module, loss_fn, args, inputs, labels, export, ours: bool) -> dict:
    """All figures of one model: FLOPs, each inference variant's latency and throughput, training throughput."""
    module = (LogitsOnly(model) if ours else model).eval()
    batch = inputs[: args.batch_size]
    single = inputs[:1]
    result = {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "variants": {}}
    with torch.inference_mode():
        result["flops_per_image"] = count_flops(lambda: module(single))
    video_segmenters = {"eager": model} if ours and "video" not in args.skip else {}
    for variant in VARIANTS:
        if variant in args.skip:
            continue
        print(f"  {variant}...", flush=True)
        figures = {}
        try:
            with tempfile.TemporaryDirectory() as workdir:
                start = time.perf_counter()
                # exports outside inference mode
                run = make_runner(variant, module, args, export, Path(workdir), inputs, FLOAT32_LAYERS if ours else ())
                figures["setup_seconds"] = time.perf_counter() - start
                # torch.compile compiles on the first call of each shape: never inside the timed runs.
                warmup = max(args.warmup, 1) if variant in ("compile", "pytorch_int8") else args.warmup
                with torch.inference_mode():
                    latency, latency_runs, warm = median_seconds(lambda: run(single), warmup, args.repeats)
                    step, step_runs, warm_batch = median_seconds(lambda: run(batch), warmup, args.repeats)
            figures.update(latency_ms=latency * 1e3, latency_runs_ms=[t * 1e3 for t in latency_runs],
                           throughput=args.batch_size / step, batch_runs_ms=[t * 1e3 for t in step_runs],
                           warmup_seconds=warm + warm_batch)
            if hasattr(run, "kernels"):
                figures["convolution_kernels"] = run.kernels()
            if video_segmenters and hasattr(run, "segmenter"):
                video_segmenters[variant] = run.segmenter
        except Exception as error:  # noqa: BLE001 - one variant failing must not lose the others
            traceback.print_exc()
            figures = {"error": f"{type(error).__name__}: {error}"[:2000]}
        result["variants"][variant] = figures
    if video_segmenters:
        print("  video (decode, segment, draw, encode)...", flush=True)
        with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
            result["video"] = {variant: video_frames_per_second(segmenter, args, Path(workdir))
                               for variant, segmenter in video_segmenters.items()}

    if "training" not in args.skip:
        # Backward taken as twice the forward: FlopCounterMode (torch 2.14) counts the backward of a grouped
        # convolution `groups` times over, which inflates ConvNeXt's depthwise 7x7 convolutions ~60-fold.
        result["train_flops_per_image"] = 3 * result["flops_per_image"]
        for variant, needs in TRAINING_VARIANTS.items() if ours else [("eager", ())]:
            if any(name in args.skip for name in needs):
                continue
            print(f"  training ({variant})...", flush=True)
            figures = train_throughput(variant, model, loss_fn, args, inputs[: args.batch_size],
                                       labels[: args.batch_size], ours)
            if variant == "eager":
                result["training"] = figures
            else:
                result.setdefault("training_variants", {})[variant] = figures
    return result


def train_throughput(variant: str, model: nn.Module, loss_fn, args, batch: torch.Tensor, labels: torch.Tensor,
                     ours: bool) -> dict:
    """Images/s of forward, backward and AdamW step on a copy of `model`, in one of `TRAINING_VARIANTS`."""
    try:
        start = time.perf_counter()
        train_model = copy.deepcopy(model).train()
        if variant != "eager":
            train_model = train_model.to(memory_format=torch.channels_last)
            batch = batch.contiguous(memory_format=torch.channels_last)
        # As train_accelerate.py: only the forward is compiled, the loss and the optimiser step stay eager.
        forward_model = torch.compile(train_model, backend=args.compile_backend) if variant.endswith("compile") \
            else train_model
        optimizer = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
        forward = (lambda x: forward_model(pixel_values=x).logits) if ours else forward_model

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(forward(batch), labels, 0.5)
            loss.backward()
            optimizer.step()

        warmup = max(args.warmup, 1) if variant.endswith("compile") else args.warmup
        setup_seconds = time.perf_counter() - start
        step, step_runs, warmup_seconds = median_seconds(train_step, warmup, args.repeats)
        return {"throughput": args.batch_size / step, "step_runs_ms": [t * 1e3 for t in step_runs],
                "setup_seconds": setup_seconds, "warmup_seconds": warmup_seconds}
    except Exception as error:  # noqa: BLE001 - one variant failing must not lose the others
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"[:2000]}


# ----------------------------------------------------------------------------------------------------------- reports


def add_ratios(results: list[dict], peak: float | None, int8_peak: float | None = None) -> None:
    """Ratios to this model's eager (and training) figures, and the GFLOP/s achieved (against the int8 peak for the
    int8 variants: the same operations, done as int8 multiply-adds)."""
    ours = results[0]
    base = ours["variants"].get("eager", {})
    base_train = ours.get("training", {}).get("throughput")
    for result in results:
        for variant, figures in result["variants"].items():
            if "error" in figures:
                continue
            if base.get("latency_ms"):
                figures["latency_vs_ours_eager"] = figures["latency_ms"] / base["latency_ms"]
            if base.get("throughput"):
                figures["throughput_vs_ours_eager"] = figures["throughput"] / base["throughput"]
            figures["gflops_per_second"] = result["flops_per_image"] * figures["throughput"] / 1e9
            if peak and variant in INT8_VARIANTS and int8_peak:
                figures["fraction_of_int8_peak"] = figures["gflops_per_second"] / int8_peak
            elif peak:
                figures["fraction_of_peak"] = figures["gflops_per_second"] / peak
        for training in (result.get("training", {}), *result.get("training_variants", {}).values()):
            if "throughput" not in training:
                continue
            if base_train:
                training["throughput_vs_ours_training"] = training["throughput"] / base_train
            training["gflops_per_second"] = result["train_flops_per_image"] * training["throughput"] / 1e9
            if peak:
                training["fraction_of_peak"] = training["gflops_per_second"] / peak








# -------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAP_VARIABLES if os.environ.get(name)]
    command = " ".join([*caps, "python benchmarks/bench_cpu.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    inputs = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=generator)
    labels = (torch.rand(args.batch_size, 1, args.resolution, args.resolution, generator=generator) > 0.7).float()

    cpu = cpu_info()
    cpu["peak_gflops"] = peak_gflops(cpu, min(args.threads, cpu["available_cpus"]))
    cpu["int8_peak_gops"] = peak_gflops(cpu, min(args.threads, cpu["available_cpus"]), "int8_ops_per_cycle_per_core")
    notes = []
    load = os.getloadavg()[0]
    if load > 0.5:
        notes.append(f"the 1-minute load average was {load:.1f} when the benchmark started: other processes were "
                     "using the CPU, so these figures understate the machine.")
        print(f"warning: {notes[-1]}", file=sys.stderr)

    if "pytorch_int8" not in args.skip and importlib.util.find_spec("torchao") is None:
        args.skip.append("pytorch_int8")
        notes.append("pytorch_int8 skipped: torchao is not installed (`pip install -r requirements-bench.txt`).")
        print(f"warning: {notes[-1]}", file=sys.stderr)

    torch.manual_seed(args.seed)
    model, description, loss_fn = build_ours(args)
    # (name, description, model, is this model, export to a path for ONNX Runtime)
    models = [(OURS, description, model, True, lambda path, m=model: export_model(m, path))]
    for peer, builder in (("smp", build_smp), ("monai", build_monai)):
        if peer in args.skip:
            continue
        try:
            torch.manual_seed(args.seed)
            peer_model, peer_description = builder(args)
        except ImportError as error:
            notes.append(f"{PEER_NAMES[peer]} skipped: {error.name} is not installed "
                         "(`pip install -r requirements-bench.txt`).")
            print(f"warning: {notes[-1]}", file=sys.stderr)
            continue
        example = inputs[:2].clone()

        def export(path, m=peer_model, x=example):
            return export_to_onnx(m, x, path, ["logits"], dynamic_axes=DYNAMIC_AXES)

        models.append((PEER_NAMES[peer], peer_description, peer_model, False, export))

    results = []
    for name, description, model, ours, export in models:
        print(f"Benchmarking {name}: {description}", flush=True)
        result = benchmark_model(name, model.float().eval(), loss_fn, args, inputs, labels, export, ours)
        result["description"] = description
        results.append(result)
    add_ratios(results, cpu["peak_gflops"], cpu["int8_peak_gops"])
    print("Eager batch-1 latency, models interleaved...", flush=True)
    interleaved = interleaved_latency_ms(
        {name: (LogitsOnly(model) if ours else model).eval() for name, _, model, ours, _ in models},
        inputs[:1], args.warmup, 3 * args.repeats,
    )

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module_name in ("onnxruntime", "openvino", "nncf", "torchao", "timm", "transformers",
                        "segmentation_models_pytorch", "monai"):
        if module_name in sys.modules:
            versions[module_name] = sys.modules[module_name].__version__
    report = {
        "command": command,
        "settings": {key: value for key, value in vars(args).items() if key != "output_json"},
        "machine": {**cpu, "load_average_1min": load},
        "versions": versions,
        "notes": notes,
        "results": results,
        "interleaved_eager_latency_ms": interleaved,
    }
    print("\n" + render_performance(report))
    write_output_json(args.output_json, report)
    return report


if __name__ == "__main__":
    main()
