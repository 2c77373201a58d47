"""Binary segmentation metrics shared by training and evaluation.

Everything is computed from per-image confusion counts `(tp, fp, fn, tn)`, so the figures are exact whatever the
batching and can be gathered across processes. Two aggregations are reported:

- **mean over images** (`mean_*`): the metric computed per image, then averaged. This is the polyp literature's
  mDice / mIoU.
- **pooled** (`pooled_*`): the metric computed once over all pixels of the split.

Empty cases: a ratio whose denominator is zero (an image with no polyp and no predicted polyp for Dice and IoU, no
predicted pixel for precision, no true pixel for recall) scores 1 when the image has no error and 0 otherwise.
"""

import torch

METRIC_NAMES = ("dice", "iou", "f1", "precision", "recall", "accuracy")


def confusion_counts(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image `(tp, fp, fn, tn)` of binary masks shaped `(B, ...)`; returns `(B, 4)` int64."""
    predictions = predictions.bool().flatten(1)
    targets = targets.bool().flatten(1)
    tp = (predictions & targets).sum(1)
    fp = (predictions & ~targets).sum(1)
    fn = (~predictions & targets).sum(1)
    tn = (~predictions & ~targets).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    empty_score = (errors == 0).double()
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), empty_score)


def metrics_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """`(N, 4)` counts -> one tensor of N scores per name in `METRIC_NAMES`."""
    tp, fp, fn, tn = counts.double().unbind(dim=1)
    dice = _ratio(2 * tp, 2 * tp + fp + fn, fp + fn)
    return {
        "dice": dice,
        "iou": _ratio(tp, tp + fp + fn, fp + fn),
        # For one binary class F1 and Dice are the same number; both are listed because the seed card lists both.
        "f1": dice,
        "precision": _ratio(tp, tp + fp, fp + fn),
        "recall": _ratio(tp, tp + fn, fp + fn),
        "accuracy": (tp + tn) / (tp + fp + fn + tn).clamp(min=1),
    }


def summarize(counts: torch.Tensor) -> dict[str, float]:
    """`(N, 4)` counts of a whole split -> `mean_<metric>` over images and `pooled_<metric>` over pixels."""
    per_image = metrics_from_counts(counts)
    pooled = metrics_from_counts(counts.sum(dim=0, keepdim=True))
    summary = {f"mean_{name}": per_image[name].mean().item() for name in METRIC_NAMES}
    summary.update({f"pooled_{name}": pooled[name].item() for name in METRIC_NAMES})
    return summary


def format_table(summary: dict[str, float], loss: float | None = None) -> str:
    """A Markdown table of a `summarize` result: one row per metric, mean over images and pooled."""
    lines = ["| metric | mean over images | pooled over pixels |", "| --- | ---: | ---: |"]
    for name in METRIC_NAMES:
        lines.append(f"| {name} | {summary[f'mean_{name}']:.4f} | {summary[f'pooled_{name}']:.4f} |")
    if loss is not None:
        lines.append(f"| loss (BCE + Dice) | {loss:.4f} | |")
    return "\n".join(lines)


# A polyp-free frame counts as a false alarm when more than this share of it is marked as polyp.
FALSE_ALARM_AREA = 0.01


def false_alarm_summary(counts: torch.Tensor) -> dict[str, float]:
    """`(N, 4)` counts of polyp-free frames -> `false_alarm_rate` (frames with more than `FALSE_ALARM_AREA` of their
    pixels marked), `any_pixel_rate` (frames with any marked pixel) and `mean_marked_fraction`."""
    marked = (counts[:, 0] + counts[:, 1]).double() / counts.sum(dim=1).clamp(min=1).double()
    return {
        "false_alarm_rate": (marked > FALSE_ALARM_AREA).double().mean().item(),
        "any_pixel_rate": (marked > 0).double().mean().item(),
        "mean_marked_fraction": marked.mean().item(),
    }


def roc_auc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float:
    """Area under the ROC curve of a frame score: the probability that a frame with a polyp scores above a polyp-free
    one, ties counting half (the Mann-Whitney U statistic)."""
    positive, negative = positive_scores.double()[:, None], negative_scores.double()[None, :]
    return ((positive > negative).double() + 0.5 * (positive == negative).double()).mean().item()


def counts_with_frames_judged_free(counts: torch.Tensor, scores: torch.Tensor,
                                   presence_threshold: float | None) -> torch.Tensor:
    """`(N, 4)` counts as they become when the frames whose polyp score `(N,)` is below `presence_threshold` get an
    empty mask (their marked pixels turn into misses or true negatives)."""
    if presence_threshold is None:
        return counts
    tp, fp, fn, tn = counts.unbind(dim=1)
    emptied = torch.stack([torch.zeros_like(tp), torch.zeros_like(fp), tp + fn, fp + tn], dim=1)
    return torch.where((scores < presence_threshold)[:, None], emptied, counts)


def presence_threshold_for(positive_scores: torch.Tensor, min_sensitivity: float) -> float:
    """The largest presence threshold that still judges at least `min_sensitivity` of the frames with a polyp (their
    scores `(N,)`) to hold one."""
    ordered = positive_scores.double().sort().values
    allowed_misses = int((1.0 - min_sensitivity) * len(ordered) + 1e-9)
    return ordered[allowed_misses].item()

