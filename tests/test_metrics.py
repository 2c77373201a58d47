"""Segmentation metrics against hand-computed cases."""


import pytest
import torch

from polyp_segmentation.metrics import confusion_counts, metrics_from_counts, summarize


def test_metrics_against_hand_computed_cases():
    prediction = torch.zeros(4, 2, 2, dtype=torch.bool)
    target = torch.zeros(4, 2, 2, dtype=torch.bool)
    prediction[0, 0, :] = True  # tp=1, fp=1
    target[0, 0, 0] = target[0, 1, 0] = True  # fn=1, tn=1
    # image 1: no polyp and no prediction; image 2: a polyp entirely missed; image 3: a prediction with no polyp
    target[2, 0, 0] = True
    prediction[3, 1, 1] = True
    counts = confusion_counts(prediction, target)
    assert counts.tolist() == [[1, 1, 1, 1], [0, 0, 0, 4], [0, 0, 1, 3], [0, 1, 0, 3]]
    scores = metrics_from_counts(counts)
    assert scores["dice"].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    assert scores["iou"].tolist() == pytest.approx([1 / 3, 1.0, 0.0, 0.0])
    assert scores["precision"].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    assert scores["recall"].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    assert scores["accuracy"].tolist() == pytest.approx([0.5, 1.0, 0.75, 0.75])
    summary = summarize(counts)
    assert summary["mean_dice"] == pytest.approx(1.5 / 4)
    # Pooled: tp=1, fp=2, fn=2, tn=11 over all 16 pixels.
    assert summary["pooled_dice"] == pytest.approx(2 / 6)
    assert summary["pooled_accuracy"] == pytest.approx(12 / 16)

