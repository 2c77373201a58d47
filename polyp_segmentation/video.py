"""Segmenting colonoscopy videos frame by frame (PyAV): the overlaid video and a per-frame CSV."""

import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .drawing import overlay_mask
from .inference import FrameSegmentation

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".mov"}
VIDEO_CSV_FIELDS = ("frame_index", "time_seconds", "polyp_present", "polyp_score", "polyp_area_fraction",
                    "mean_probability")


@dataclass
class VideoSummary:
    frames: int
    segmented_frames: int
    frames_per_second: float  # the source's rate
    width: int
    height: int
    seconds: float  # wall time of the whole pass
    output_video: Path
    output_csv: Path


def read_video(path: str | Path) -> Iterator:
    """Decoded frames of the first video stream of `path`, as PyAV `VideoFrame`s. Raises `ValueError` naming the
    file when it is not a readable video."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise ValueError(f"{path}: not a readable video ({error}).") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: holds no video stream.")
        try:
            yield from container.decode(video=0)
        except av.error.FFmpegError as error:
            raise ValueError(f"{path}: the video is damaged ({error}).") from error


def segment_video(
    segment: Callable[[list[np.ndarray]], list[FrameSegmentation]],
    path: str | Path,
    output_video: str | Path,
    output_csv: str | Path,
    every: int = 1,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> VideoSummary:
    """Segments every `every`-th frame of the video at `path` with `segment` (frames -> results), and writes the
    overlaid video (the source's frame rate and size; frames in between show the latest mask) and a CSV with one row
    per segmented frame: `VIDEO_CSV_FIELDS`. `progress` is called with the number of frames done since its last call.
    Raises `ValueError` naming the file for an unreadable or damaged video; the partial outputs are then removed."""
    import av

    output_video, output_csv = Path(output_video), Path(output_csv)
    start = time.perf_counter()
    frames_read = segmented = 0
    writer = stream = rate = None
    try:
        with open(output_csv, "w", newline="") as csv_file:
            rows = csv.writer(csv_file)
            rows.writerow(VIDEO_CSV_FIELDS)
            pending: list[tuple[int, float, np.ndarray]] = []
            latest_mask = None

            def flush() -> None:
                nonlocal latest_mask, segmented
                to_segment = [(index, seconds, rgb) for index, seconds, rgb in pending if index % every == 0]
                results = iter(segment([rgb for _, _, rgb in to_segment]) if to_segment else [])
                for index, seconds, rgb in pending:
                    if index % every == 0:
                        result = next(results)
                        latest_mask = result.mask
                        rows.writerow([index, f"{seconds:.6f}", int(result.present), f"{result.score:.6f}",
                                       f"{result.area_fraction:.6f}", f"{float(result.probability.mean()):.6f}"])
                        segmented += 1
                    shown = overlay_mask(rgb, latest_mask) if latest_mask is not None else rgb
                    for packet in stream.encode(av.VideoFrame.from_ndarray(shown, format="rgb24")):
                        writer.mux(packet)
                if progress is not None and pending:
                    progress(len(pending))
                pending.clear()

            for frame in read_video(path):
                if writer is None:
                    writer, stream, rate = _open_video_writer(output_video, path, frame)
                seconds = float(frame.time) if frame.time is not None else frames_read / float(rate)
                pending.append((frames_read, seconds, frame.to_ndarray(format="rgb24")))
                frames_read += 1
                if len(pending) >= batch_size * every:
                    flush()
            if writer is None:
                raise ValueError(f"{path}: holds no decodable frame.")
            flush()
            for packet in stream.encode():
                writer.mux(packet)
    except Exception:
        if writer is not None:
            writer.close()
            writer = None
        output_video.unlink(missing_ok=True)
        output_csv.unlink(missing_ok=True)
        raise
    finally:
        if writer is not None:
            writer.close()
    return VideoSummary(frames_read, segmented, float(rate), stream.width, stream.height,
                        time.perf_counter() - start, output_video, output_csv)


def _open_video_writer(output_video: Path, source_path, first_frame):
    """An H.264 writer at the source's rate and the first frame's size (yuv444p when a side is odd, which 4:2:0
    cannot hold)."""
    import av

    with av.open(str(source_path)) as source:
        rate = source.streams.video[0].average_rate or source.streams.video[0].guessed_rate or 25
    writer = av.open(str(output_video), "w")
    stream = writer.add_stream("libx264", rate=rate)
    stream.width, stream.height = first_frame.width, first_frame.height
    stream.pix_fmt = "yuv420p" if first_frame.width % 2 == 0 and first_frame.height % 2 == 0 else "yuv444p"
    stream.options = {"crf": "18"}
    return writer, stream, rate

