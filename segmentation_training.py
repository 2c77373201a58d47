"""The training step's set-up shared by train_accelerate.py and benchmarks/bench_train.py, so that the benchmark times
the step the training script runs."""

import torch
from torch import nn

FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                    device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW without weight decay on biases and normalisation weights, as in transformers' and timm's recipes.

    On CPUs and CUDA GPUs it is PyTorch's fused implementation: on a CPU the default one loops over the tensors in
    Python (for-each is only the default on GPUs), 0.24 s against 0.02 s a step for this model's 32 M parameters on 2
    cores. `device_type` is where the parameters will be when the optimiser steps.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=True if device_type in FUSED_OPTIMIZER_DEVICES else None)
