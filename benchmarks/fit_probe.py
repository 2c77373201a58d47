#!/usr/bin/env python
"""Fit probe: how fast does a model, trained from scratch, fit a few Kvasir-SEG training frames?

    python benchmarks/fit_probe.py                                             # this model, as config.json builds it
    python benchmarks/fit_probe.py --config_overrides '{"use_attention_gates": false}'
    python benchmarks/fit_probe.py --model smp-convnext                        # needs requirements-bench.txt
    python benchmarks/fit_probe.py --init_encoder_from .                       # encoder from the shipped weights

It trains on the first `--frames` training frames (resized to `--size`, with the training augmentation), batch
`--batch_size`, AdamW (weight decay 1e-4, none on biases and norms), cosine with 5 % warm-up over `--steps`, this
model's loss (0.5 BCE + 0.5 soft Dice) for every model, and then scores the same frames without augmentation (mean
Dice over images, threshold 0.5) and, with `--eval_validation`, the validation split at the same size. Same seed, same
data order for every model, so models are compared at equal steps: a decoder that optimises slowly scores low. It
prints one JSON line (and appends it to `--output_jsonl`). About 8 minutes on 2 CPU cores with the defaults; run one
probe at a time, as two on the same cores slow each other far more than twofold.

    python benchmarks/fit_probe.py --label "..." --eval_validation --output_jsonl benchmarks/fit_probe.jsonl

`make_model_card.py` turns `benchmarks/fit_probe.jsonl` into the card's fit-probe table.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from polyp_segmentation.data import PolypSegmentationDataset, decode_samples, load_local_splits, training_augmentation
from polyp_segmentation.loading import check_remote_code_arguments
from polyp_segmentation.metrics import confusion_counts, summarize
from polyp_segmentation.testing import REPO_ROOT

MODELS = ("ours", "smp-convnext", "smp-resnet34")
IMAGENET_STATISTICS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ours", choices=MODELS)
    parser.add_argument("--config_name", default=str(REPO_ROOT), help="Config folder (or Hub id) for `ours`.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow a Hub id for --config_name, whose Python code then runs here.")
    parser.add_argument("--config_overrides", default="{}", help="JSON object of config fields for `ours`.")
    parser.add_argument("--init_encoder_from", default=None,
                        help="A model folder whose `encoder.*` tensors start `ours` (the rest from scratch).")
    parser.add_argument("--dataset_name", default=os.environ.get("KVASIR_SEG_DIR", "../shared/data/kvasir-seg"),
                        help="A local Kvasir-SEG folder (images/, masks/, splits/).")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--eval_validation", action="store_true", help="Also score the validation split.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="What this probe measures, for the table.")
    parser.add_argument("--output_jsonl", default=None, help="Append the result line to this file.")
    args = parser.parse_args(argv)
    check_remote_code_arguments(parser, args.trust_remote_code, {"--config_name": args.config_name})
    return args


def build_model(args: argparse.Namespace):
    """Returns the model, its forward (images -> logits), its training loss (images, labels -> loss) and the
    `(image_mean, image_std)` its input must be normalised with (`(None, None)`: values in [0, 1], for a model that
    normalises them itself). The loss is this project's (from the model code, as `trust_remote_code` loads it) for
    every model; for ours the model's own, which adds the auxiliary heads' with `use_auxiliary_heads`."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(args.config_name, trust_remote_code=True, **json.loads(args.config_overrides))
    torch.manual_seed(args.seed)
    if args.model == "ours":
        model = AutoModel.from_config(config, trust_remote_code=True)
        if args.init_encoder_from:
            weights = load_file(Path(args.init_encoder_from) / "model.safetensors")
            model.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in weights.items()
                                           if k.startswith("encoder.")})
        forward = lambda x: model(pixel_values=x).logits  # noqa: E731
        normalization = (None, None) if config.image_mean is not None else IMAGENET_STATISTICS
        return model, forward, lambda x, y: model(pixel_values=x, labels=y).loss, normalization
    else:
        import segmentation_models_pytorch as smp

        modeling = sys.modules[type(AutoModel.from_config(config, trust_remote_code=True)).__module__]
        encoder = {"smp-convnext": "tu-convnext_tiny", "smp-resnet34": "resnet34"}[args.model]
        torch.manual_seed(args.seed)
        model = smp.Unet(encoder, encoder_weights=None, classes=1)
        return model, model, lambda x, y: modeling.attention_unet_loss(model(x), y, 0.5), IMAGENET_STATISTICS


def score(forward, dataset: PolypSegmentationDataset) -> float:
    """Mean Dice over the images of `dataset`, threshold 0.5."""
    counts = []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=16):
            counts.append(confusion_counts(forward(batch["pixel_values"]) > 0, batch["labels"][:, None]))
    return summarize(torch.cat(counts))["mean_dice"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits, _ = load_local_splits(args.dataset_name)
    names, images, masks, bad = decode_samples(splits["train"][: args.frames], args.size)
    if bad:
        raise SystemExit(f"unusable frames: {bad}")
    model, forward, training_loss, (mean, std) = build_model(args)
    train = PolypSegmentationDataset(names, images, masks, mean, std, training_augmentation(None), 1)
    plain = PolypSegmentationDataset(names, images, masks, mean, std)

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate)
    from transformers import get_scheduler

    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=round(0.05 * args.steps),
                              num_training_steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=min(args.batch_size, len(train)), shuffle=True,
                                         drop_last=True, generator=generator)
    step, epoch, start = 0, 0, time.time()
    model.train()
    while step < args.steps:
        train.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            loss = training_loss(batch["pixel_values"], batch["labels"][:, None])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step >= args.steps:
                break
    model.eval()
    result = {"label": args.label, "model": args.model, "config_overrides": json.loads(args.config_overrides),
              "init_encoder_from": args.init_encoder_from, "frames": args.frames, "size": args.size,
              "batch_size": args.batch_size, "steps": args.steps, "learning_rate": args.learning_rate, "seed": args.seed,
              "final_batch_loss": round(loss.item(), 4), "fit_mean_dice": round(score(forward, plain), 4)}
    if args.eval_validation:
        names, images, masks, _ = decode_samples(splits["validation"], args.size)
        result["validation_mean_dice"] = round(score(forward, PolypSegmentationDataset(names, images, masks, mean, std)), 4)
    result["minutes"] = round((time.time() - start) / 60, 1)
    print(json.dumps(result))
    if args.output_jsonl:
        with open(args.output_jsonl, "a") as results_file:
            results_file.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
