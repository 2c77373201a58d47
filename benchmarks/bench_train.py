#!/usr/bin/env python
"""Training throughput, split into its two halves, on whatever device is present:

- the input pipeline alone: decoded Kvasir-SEG frames through the training augmentation (train_accelerate.py's, 160
  crops with zoom jitter by default), in the main process (frames/s per core), through a DataLoader with the
  default workers (min(8, cores)), and on the training device (`--augment_on_device`: the same draws, the warps
  run by the device);
- the training step alone (forward, loss, backward, train_accelerate.py's AdamW) on a fixed batch already on the
  device: fp32, channels-last, and channels-last with `--float32_matmul_precision medium`, and on CUDA also fp16 and
  bf16 autocast, each optionally with `torch.compile`;
- the two together: the DataLoader feeding the step, with the step's share of the time;
- one float32 matrix product the size of the encoder's largest MLP, at each matmul precision: GFLOP/s and its error.

    python benchmarks/bench_train.py --dataset_name ../shared/data/kvasir-seg --output_json benchmarks/train_cpu.json
    python benchmarks/bench_train.py --tiny        # a smoke run: tiny model, 64x64, a few steps

Prints a table; the last line of stdout is one JSON object with at least `device`,
`pipeline_frames_per_second_per_core` and `train_frames_per_second` (the two together).
"""

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from polyp_segmentation.cli import write_output_json
from polyp_segmentation.data import PolypSegmentationDataset, decode_samples, load_local_splits, training_augmentation
from polyp_segmentation.loading import check_remote_code_arguments
from polyp_segmentation.testing import REPO_ROOT, TINY_OVERRIDES
from polyp_segmentation.training import build_optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default=str(REPO_ROOT.parent / "shared" / "data" / "kvasir-seg"))
    parser.add_argument("--config_name", default=str(REPO_ROOT), help="Config folder (or Hub id) of the model.")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--resolution", type=int, default=256, help="Frames are decoded at this size (default 256).")
    parser.add_argument("--train_crop_size", type=int, default=160, help="Training crops (default 160; 0: none).")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--frames", type=int, default=64, help="Decoded frames the pipeline draws from.")
    parser.add_argument("--steps", type=int, default=8, help="Timed training steps per variant.")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--dataloader_num_workers", type=int, default=None, help="Default: min(8, cores).")
    parser.add_argument("--torch_compile", action="store_true", help="Also time each variant compiled.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny model, 64x64 frames, 32 crops, a few steps.")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    check_remote_code_arguments(parser, args.trust_remote_code, {"--config_name": args.config_name})
    if args.tiny:
        args.resolution, args.train_crop_size, args.frames = 64, 32, 16
        args.steps, args.warmup_steps, args.per_device_train_batch_size = 3, 1, 4
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = min(8, os.cpu_count() or 1)
    return args


def build_dataset(args, augment_on_access: bool = True) -> PolypSegmentationDataset:
    splits, _ = load_local_splits(args.dataset_name)
    names, images, masks, bad = decode_samples(splits["train"][: args.frames], args.resolution)
    if bad:
        raise SystemExit(f"unusable frames: {bad}")
    augmentation = training_augmentation(args.train_crop_size or None, zoom=(0.75, 1.33))
    # Values in [0, 1]: the model (the root config's) normalises them itself.
    return PolypSegmentationDataset(names, images, masks, None, None, augmentation, 0, augment_on_access)


def build_loader(dataset, args) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=args.per_device_train_batch_size, shuffle=True,
                                       drop_last=True, num_workers=args.dataloader_num_workers,
                                       pin_memory=args.device.startswith("cuda"),
                                       persistent_workers=args.dataloader_num_workers > 0)


def pipeline_alone(dataset, args) -> dict:
    """Frames/s of the augmentation in this process (one core) and through a DataLoader with workers."""
    torch.set_num_threads(1)
    count = max(len(dataset), 2 * args.per_device_train_batch_size)
    start = time.perf_counter()
    for index in range(count):
        dataset[index % len(dataset)]
    per_core = count / (time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    loader = build_loader(dataset, args)
    seen, start = 0, None
    for epoch in range(3):
        for batch in loader:
            if start is None:  # the first batch pays for starting the workers
                start = time.perf_counter()
                continue
            seen += len(batch["labels"])
    workers = seen / (time.perf_counter() - start) if seen else float("nan")
    return {"pipeline_frames_per_second_per_core": per_core, "pipeline_frames_per_second": workers,
            "pipeline_workers": args.dataloader_num_workers,
            "pipeline_frames_per_second_on_device": on_device(args)}


def on_device(args) -> float:
    """Frames/s of `prepare_batch` on the training device, from raw batches already there."""
    raw = build_dataset(args, augment_on_access=False)
    batches = [torch.utils.data.default_collate([raw[(start + i) % len(raw)]
                                                for i in range(args.per_device_train_batch_size)])
               for start in range(0, 3 * args.per_device_train_batch_size, args.per_device_train_batch_size)]
    batches = [{key: value.to(args.device) for key, value in batch.items()} for batch in batches]
    raw.prepare_batch(batches[0], args.device)
    synchronize(args.device)
    start = time.perf_counter()
    for batch in batches:
        raw.prepare_batch(batch, args.device)
    synchronize(args.device)
    return len(batches) * args.per_device_train_batch_size / (time.perf_counter() - start)


def build_model(args):
    from transformers import AutoConfig, AutoModel

    overrides = TINY_OVERRIDES if args.tiny else {}
    config = AutoConfig.from_pretrained(args.config_name, trust_remote_code=True, **overrides)
    return AutoModel.from_config(config, trust_remote_code=True).to(args.device).train()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_variants(args) -> list[dict]:
    variants = [{"name": "fp32", "dtype": None, "channels_last": False},
                {"name": "fp32 channels-last", "dtype": None, "channels_last": True},
                {"name": "fp32 channels-last, matmul precision medium", "dtype": None, "channels_last": True,
                 "float32_matmul_precision": "medium"}]
    if args.device.startswith("cuda"):
        variants += [{"name": "fp16 autocast channels-last", "dtype": torch.float16, "channels_last": True},
                     {"name": "bf16 autocast channels-last", "dtype": torch.bfloat16, "channels_last": True}]
    if args.torch_compile:
        variants += [{**variant, "name": variant["name"] + " compiled", "compile": True} for variant in variants]
    return variants


def make_step(model, variant: dict, device: str):
    optimizer = build_optimizer(model, 1e-4, 0.05, device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=variant["dtype"] is torch.float16)
    forward = torch.compile(model) if variant.get("compile") else model

    def step(pixel_values, labels):
        torch.set_float32_matmul_precision(variant.get("float32_matmul_precision", "highest"))
        if variant["channels_last"]:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.split(":")[0], dtype=variant["dtype"] or torch.float32,
                            enabled=variant["dtype"] is not None):
            loss = forward(pixel_values=pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.set_float32_matmul_precision("highest")

    return step


def step_alone(args, side: int) -> list[dict]:
    """Frames/s of the training step on one fixed batch already on the device, per variant."""
    results = []
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.rand(args.per_device_train_batch_size, 3, side, side, generator=generator).to(args.device)
    labels = (torch.rand(args.per_device_train_batch_size, side, side, generator=generator) > 0.7).float()
    labels = labels.to(args.device)
    for variant in step_variants(args):
        torch.manual_seed(0)
        model = build_model(args)
        if variant["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        step = make_step(model, variant, args.device)
        for _ in range(args.warmup_steps):
            step(pixel_values, labels)
        synchronize(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(pixel_values, labels)
        synchronize(args.device)
        seconds = (time.perf_counter() - start) / args.steps
        results.append({"variant": variant["name"], "seconds_per_step": seconds,
                        "frames_per_second": args.per_device_train_batch_size / seconds})
    return results


def matrix_products(args) -> list[dict]:
    """GFLOP/s and relative error (against float64) of one float32 product the size of ConvNeXt-T's stage-3 MLP at
    batch 16 on 160x160 crops, at each `torch.set_float32_matmul_precision`."""
    m, k, n = (64, 32, 128) if args.tiny else (1600, 384, 1536)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(args.device)
    b = torch.randn(k, n, generator=generator).to(args.device)
    exact = a.double() @ b.double()
    results = []
    for precision in ("highest", "medium"):
        torch.set_float32_matmul_precision(precision)
        product = a @ b
        for _ in range(args.warmup_steps):
            a @ b
        synchronize(args.device)
        start = time.perf_counter()
        repeats = 5 * args.steps
        for _ in range(repeats):
            a @ b
        synchronize(args.device)
        seconds = (time.perf_counter() - start) / repeats
        results.append({"float32_matmul_precision": precision, "shape": [m, k, n],
                        "gflop_per_second": 2 * m * k * n / seconds / 1e9,
                        "relative_error": ((product.double() - exact).norm() / exact.norm()).item()})
    torch.set_float32_matmul_precision("highest")
    return results


def together(dataset, args, best: dict) -> dict:
    """The DataLoader (default workers) feeding the step of the fastest variant; the step's share of the time."""
    variant = next(v for v in step_variants(args) if v["name"] == best["variant"])
    torch.manual_seed(0)
    model = build_model(args)
    if variant["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    step = make_step(model, variant, args.device)
    loader = build_loader(dataset, args)
    done, seen, start = 0, 0, None
    while done < args.warmup_steps + args.steps:
        for batch in loader:
            if done == args.warmup_steps:
                synchronize(args.device)
                start = time.perf_counter()
            pixel_values = batch["pixel_values"].to(args.device, non_blocking=True)
            step(pixel_values, batch["labels"].to(args.device, non_blocking=True).float())
            done += 1
            seen += len(batch["labels"]) if start is not None else 0
            if done >= args.warmup_steps + args.steps:
                break
    synchronize(args.device)
    rate = seen / (time.perf_counter() - start)
    return {"train_frames_per_second": rate, "step_share_of_time": min(1.0, rate / best["frames_per_second"]),
            "train_variant": best["variant"]}


def cpu_name() -> str:
    """The CPU's model name and widest vector unit ("AMD EPYC, AVX-512"): `platform.processor()` only says "x86_64"."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(re.findall(r"^(model name|flags)\s*:\s*(.*)$", cpuinfo, flags=re.MULTILINE))
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return ", ".join(filter(None, [fields.get("model name") or platform.machine(), vector]))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dataset = build_dataset(args)
    side = args.train_crop_size or args.resolution
    pipeline = pipeline_alone(dataset, args)
    products = matrix_products(args)
    steps = step_alone(args, side)
    best = max(steps, key=lambda result: result["frames_per_second"])
    combined = together(dataset, args, best)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    result = {
        "device": args.device, "device_name": device_name, "cores": os.cpu_count(),
        "torch": torch.__version__, "batch_size": args.per_device_train_batch_size, "crop": side,
        **pipeline, "matrix_products": products, "step_alone": steps, **combined,
        "command": " ".join(["python benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"\nTraining throughput on {result['device_name']} ({args.device}, {result['cores']} cores), "
          f"batch {args.per_device_train_batch_size}, {side}x{side} crops:\n")
    print("| part | frames/s |\n|---|---|")
    print(f"| input pipeline, one core | {pipeline['pipeline_frames_per_second_per_core']:.1f} |")
    print(f"| input pipeline, {args.dataloader_num_workers} workers | {pipeline['pipeline_frames_per_second']:.1f} |")
    print(f"| input pipeline on {args.device} (--augment_on_device) | "
          f"{pipeline['pipeline_frames_per_second_on_device']:.1f} |")
    for step in steps:
        print(f"| training step alone, {step['variant']} | {step['frames_per_second']:.1f} |")
    print(f"| pipeline + step ({combined['train_variant']}) | {combined['train_frames_per_second']:.1f} "
          f"(the step alone would be {100 * combined['step_share_of_time']:.0f} % of that time) |")
    print()
    for product in products:
        print(f"float32 product {'x'.join(map(str, product['shape']))}, matmul precision "
              f"{product['float32_matmul_precision']}: {product['gflop_per_second']:.0f} GFLOP/s, relative error "
              f"{product['relative_error']:.1e}")
    write_output_json(args.output_json, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
