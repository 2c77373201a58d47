"""predict.py on colonoscopy video (PyAV): a clip written from Kvasir-SEG frames comes back as an overlaid video of the
same frame count, size and rate, with a per-frame CSV whose areas match predict.py's masks of the same frames; a
damaged video is reported by name and the other inputs still run."""

import csv
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from polyp_segmentation.testing import REPO_ROOT

pytestmark = pytest.mark.slow

CLIP_FRAMES, CLIP_RATE, CLIP_SIZE = 6, Fraction(5), (160, 128)  # (width, height)


def run_predict(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def decoded_frames(path: Path) -> tuple[list[np.ndarray], Fraction, tuple[int, int]]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate, (stream.width, stream.height)


def write_clip(kvasir_root: Path, path: Path) -> Path:
    """`CLIP_FRAMES` Kvasir-SEG test frames as an H.264 clip at `CLIP_RATE` frames/s and `CLIP_SIZE`."""
    import av

    names = (kvasir_root / "splits" / "test.txt").read_text().split()[:CLIP_FRAMES]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_RATE)
        stream.width, stream.height = CLIP_SIZE
        stream.pix_fmt = "yuv420p"
        for name in names:
            rgb = np.asarray(PIL.Image.open(kvasir_root / "images" / f"{name}.jpg").convert("RGB").resize(CLIP_SIZE))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(kvasir_root, tmp_path_factory) -> Path:
    return write_clip(kvasir_root, tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.fixture(scope="module")
def clip_prediction(clip, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("video_predictions")
    result = run_predict(clip, "--model", ".", "--output_dir", output_dir, "--batch_size", "4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "frames/s" in result.stdout
    return output_dir


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_video_overlay_keeps_frame_count_size_and_rate(clip, clip_prediction):
    frames, rate, size = decoded_frames(clip_prediction / "clip_overlay.mp4")
    source_frames, source_rate, source_size = decoded_frames(clip)
    assert len(frames) == len(source_frames) == CLIP_FRAMES
    assert (rate, size) == (source_rate, source_size) == (CLIP_RATE, CLIP_SIZE)
    assert any(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, source_frames)), "nothing was drawn"


def test_video_csv_areas_match_per_frame_masks(clip, clip_prediction, tmp_path):
    rows = read_csv(clip_prediction / "clip_frames.csv")
    assert list(rows[0]) == ["frame_index", "time_seconds", "polyp_present", "polyp_score", "polyp_area_fraction",
                             "mean_probability"]
    assert [int(row["frame_index"]) for row in rows] == list(range(CLIP_FRAMES))
    np.testing.assert_allclose([float(row["time_seconds"]) for row in rows],
                               [index / float(CLIP_RATE) for index in range(CLIP_FRAMES)], atol=1e-3)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for index, frame in enumerate(decoded_frames(clip)[0]):
        PIL.Image.fromarray(frame).save(frames_dir / f"frame{index:03d}.png")
    result = run_predict(frames_dir, "--model", ".", "--output_dir", tmp_path / "masks")
    assert result.returncode == 0, result.stderr[-4000:]
    areas = [(np.asarray(PIL.Image.open(tmp_path / "masks" / f"frame{index:03d}_mask.png")) > 0).mean()
             for index in range(CLIP_FRAMES)]
    np.testing.assert_allclose([float(row["polyp_area_fraction"]) for row in rows], areas, atol=1e-6)
    # The frame-level columns are those predict.py writes for the same frames as images.
    images = {row["name"]: row for row in read_csv(tmp_path / "masks" / "predictions.csv")}
    for index, row in enumerate(rows):
        image_row = images[f"frame{index:03d}"]
        assert row["polyp_present"] == image_row["polyp_present"]
        assert float(row["polyp_score"]) == pytest.approx(float(image_row["polyp_score"]), abs=1e-5)
    assert max(areas) > 0.01, "the model found no polyp in any frame: the comparison says little"
    assert all(0.0 <= float(row["mean_probability"]) <= 1.0 for row in rows)


def test_every_n_segments_every_nth_frame_and_keeps_every_frame(clip, tmp_path):
    result = run_predict(clip, "--model", ".", "--output_dir", tmp_path, "--every", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert [int(row["frame_index"]) for row in read_csv(tmp_path / "clip_frames.csv")] == [0, 2, 4]
    assert len(decoded_frames(tmp_path / "clip_overlay.mp4")[0]) == CLIP_FRAMES


def test_a_damaged_video_is_reported_and_the_other_inputs_still_run(clip, kvasir_root, tmp_path):
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])
    image = sorted((kvasir_root / "images").glob("*.jpg"))[0]
    result = run_predict(damaged, image, "--model", ".", "--output_dir", tmp_path / "out")
    assert result.returncode == 1
    assert str(damaged) in result.stderr
    assert (tmp_path / "out" / f"{image.stem}_mask.png").is_file()
    assert not (tmp_path / "out" / "damaged_overlay.mp4").exists()
    assert not (tmp_path / "out" / "damaged_frames.csv").exists()


def test_read_ahead_yields_every_item_in_order_and_raises_where_the_producer_failed():
    from polyp_segmentation.video import read_ahead

    assert list(read_ahead(iter(range(50)), limit=3)) == list(range(50))

    def failing():
        yield from range(5)
        raise ValueError("clip.mp4: the video is damaged")

    received = []
    with pytest.raises(ValueError, match="clip.mp4"):
        for item in read_ahead(failing(), limit=2):
            received.append(item)
    assert received == list(range(5))


def test_read_ahead_stops_its_producer_when_the_consumer_stops_early():
    import threading
    from contextlib import closing

    from polyp_segmentation.video import read_ahead

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    with closing(read_ahead(endless(), limit=2)) as items:
        assert next(items) == 0
    assert not any(thread.name == "read_ahead" for thread in threading.enumerate())
    assert len(produced) <= 4
