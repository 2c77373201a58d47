"""Fine-tuning as transformers users do it: the image processor turns frames and masks into `pixel_values` and
`labels` (the Segformer convention), and `transformers.Trainer` trains the model on them, saves it and reloads it."""

import numpy as np
import PIL.Image
import pytest
import torch

from polyp_segmentation.testing import REPO_ROOT, TINY_OVERRIDES, make_model


@pytest.fixture(scope="module")
def frames_and_masks(kvasir_root):
    names = (kvasir_root / "splits" / "train.txt").read_text().split()[:8]
    return ([PIL.Image.open(kvasir_root / "images" / f"{name}.jpg") for name in names],
            [PIL.Image.open(kvasir_root / "masks" / f"{name}.jpg") for name in names], names)


def test_processor_returns_labels_for_segmentation_maps_as_training_decodes_them(frames_and_masks, kvasir_root):
    from transformers import AutoImageProcessor

    from polyp_segmentation.data import decode_sample, load_local_splits

    images, masks, names = frames_and_masks
    processor = AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    batch = processor(images[:3], segmentation_maps=masks[:3], return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, 256, 256)
    assert batch["labels"].shape == (3, 256, 256) and batch["labels"].dtype == torch.int64
    by_name = {sample.name: sample for sample in load_local_splits(kvasir_root)[0]["train"]}
    for labels, name in zip(batch["labels"], names):
        _, expected = decode_sample(by_name[name], resolution=256)
        assert torch.equal(labels.bool(), expected)
        assert 0.0 < labels.float().mean() < 1.0
    with pytest.raises(ValueError, match="2 segmentation maps for 3 images"):
        processor(images[:3], segmentation_maps=masks[:2])


def test_trainer_fine_tunes_on_real_frames_and_the_result_reloads(frames_and_masks, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, Trainer, TrainingArguments

    images, masks, _ = frames_and_masks
    processor = AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True, size={"height": 64, "width": 64})
    encoded = processor(images, segmentation_maps=masks, return_tensors="pt")
    dataset = [{"pixel_values": encoded["pixel_values"][i], "labels": encoded["labels"][i]} for i in range(len(images))]
    model = make_model(**TINY_OVERRIDES).train()
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=16, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]), losses

    trainer.save_model(str(tmp_path / "fine-tuned"))
    processor.save_pretrained(tmp_path / "fine-tuned")
    reloaded = AutoModel.from_pretrained(tmp_path / "fine-tuned", trust_remote_code=True).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(encoded["pixel_values"]).logits, model(encoded["pixel_values"]).logits)
