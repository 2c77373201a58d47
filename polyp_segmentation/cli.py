"""Command-line arguments the scripts share."""

import argparse
import json
from pathlib import Path

from polyp_segmentation.loading import check_remote_code_arguments
from polyp_segmentation.runtimes import MissingRuntimeError

MODEL_HELP = "A saved model folder or a Hub model id."


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = None, required: bool = False,
                        help: str = MODEL_HELP) -> None:
    """`--model`, `--revision` and `--trust_remote_code`, as every script that loads a saved model takes them; check
    the parsed values with `check_model_arguments`."""
    parser.add_argument("--model", default=default, required=required, help=help)
    parser.add_argument("--revision", default=None, help="Branch, tag or commit of a Hub model.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow a Hub model, whose Python code (configuration, model, processor) then runs here.")


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`parser.error` (nothing downloaded or run) where `--model` names a Hub model without `--trust_remote_code`."""
    check_remote_code_arguments(parser, args.trust_remote_code, {"--model": args.model})


def add_float32_matmul_precision_argument(parser: argparse.ArgumentParser) -> None:
    """`--float32_matmul_precision`, as train_accelerate.py, evaluate_model.py, predict.py and app.py take it."""
    parser.add_argument(
        "--float32_matmul_precision", choices=("highest", "high", "medium"), default=None,
        help="torch.set_float32_matmul_precision for the run (default: PyTorch's, 'highest'). 'high' and 'medium' "
             "allow TF32 / bf16 inside float32 matrix products where the hardware has them; 'medium' also sends a "
             "CPU's float32 matrix products through oneDNN, 2.3x faster than MKL on AVX-512 AMD CPUs and still "
             "float32 there (docs/training.md: Training speed on a CPU).")


def write_output_json(path: str | Path | None, result: dict) -> None:
    """A script's `--output_json`: `result` as indented JSON (folders made as needed); nothing when `path` is None."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWrote {path}")


def check_optional_runtimes(parser: argparse.ArgumentParser, *importers) -> None:
    """`parser.error` naming the package to install (exit status 2, before any model is loaded) for the first of
    `importers` (e.g. `runtimes.import_openvino`) whose runtime is not installed."""
    for importer in importers:
        try:
            importer()
        except MissingRuntimeError as error:
            parser.error(str(error))
