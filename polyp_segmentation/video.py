"""Segmenting colonoscopy videos frame by frame (PyAV): the overlaid video and a per-frame CSV."""

import csv
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
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


def read_ahead(items: Iterator, limit: int) -> Iterator:
    """The items of `items`, produced by a background thread up to `limit` ahead of the consumer: FFmpeg decodes
    without holding the GIL, so the next frames decode while the model runs. The producer's exception is raised in
    the consumer, at the item where it happened."""
    buffer: queue.Queue = queue.Queue(maxsize=limit)
    stopped = threading.Event()
    done = object()

    def offer(entry) -> bool:
        """Puts `entry` unless the consumer has stopped (which never empties a full buffer again)."""
        while not stopped.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            offer((done, error))

    producer = threading.Thread(target=produce, daemon=True, name="read_ahead")
    producer.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stopped.set()
        producer.join()


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
    Decoding (a thread reading ahead), the model (this thread) and drawing + encoding (a second thread) overlap.
    Raises `ValueError` naming the file for an unreadable or damaged video; the partial outputs are then removed."""
    output_video, output_csv = Path(output_video), Path(output_csv)
    start = time.perf_counter()
    chunk = batch_size * every
    frames_read = segmented = 0
    writer = stream = rate = None
    latest_mask = None
    encoding: list[Future] = []
    try:
        decoded = read_ahead(((frame, frame.to_ndarray(format="rgb24")) for frame in read_video(path)), 2 * chunk)
        with open(output_csv, "w", newline="") as csv_file, closing(decoded), ThreadPoolExecutor(1) as encoder:
            rows = csv.writer(csv_file)
            rows.writerow(VIDEO_CSV_FIELDS)
            for pending in _batches(decoded, chunk):
                if writer is None:
                    writer, stream, rate = _open_video_writer(output_video, path, pending[0][0])
                pending = [(frames_read + i, _seconds(frame, frames_read + i, rate), rgb)
                           for i, (frame, rgb) in enumerate(pending)]
                frames_read += len(pending)
                to_segment = [rgb for index, _, rgb in pending if index % every == 0]
                results = iter(segment(to_segment) if to_segment else [])
                shown_masks = []
                for index, seconds, rgb in pending:
                    if index % every == 0:
                        result = next(results)
                        latest_mask = result.mask
                        rows.writerow([index, f"{seconds:.6f}", int(result.present), f"{result.score:.6f}",
                                       f"{result.area_fraction:.6f}", f"{float(result.probability.mean()):.6f}"])
                        segmented += 1
                    shown_masks.append(latest_mask)
                # One encoder thread takes the batches in order; at most two waiting bounds the frames held.
                if len(encoding) == 2:
                    encoding.pop(0).result()
                encoding.append(encoder.submit(_encode, writer, stream, [rgb for _, _, rgb in pending], shown_masks))
                if progress is not None:
                    progress(len(pending))
            if writer is None:
                raise ValueError(f"{path}: holds no decodable frame.")
            for future in encoding:
                future.result()
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


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _seconds(frame, index: int, rate) -> float:
    return float(frame.time) if frame.time is not None else index / float(rate)


def _encode(writer, stream, frames: list[np.ndarray], masks: list[np.ndarray | None]) -> None:
    import av

    for rgb, mask in zip(frames, masks):
        shown = overlay_mask(rgb, mask) if mask is not None else rgb
        for packet in stream.encode(av.VideoFrame.from_ndarray(shown, format="rgb24")):
            writer.mux(packet)


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

