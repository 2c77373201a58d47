"""The image processor on any input users have: every image kind, size and layout, EXIF orientation, tiny and huge
frames, non-finite values; post-processing to binary masks of the target size."""

import io
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polyp_segmentation.testing import REPO_ROOT

PIL_MODES = ["L", "RGB", "RGBA", "P", "I;16", "I", "F", "CMYK", "1"]
_processor = None


def processor():
    global _processor
    if _processor is None:
        from transformers import AutoImageProcessor

        _processor = AutoImageProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    return _processor


def pixel_values(images) -> torch.Tensor:
    return processor()(images, return_tensors="pt")["pixel_values"]


def assert_unit_range_batch(values: torch.Tensor, count: int) -> None:
    assert values.shape == (count, 3, 256, 256)
    assert values.dtype == torch.float32
    assert torch.isfinite(values).all()
    assert (values >= 0).all() and (values <= 1).all()


def pil_image(mode: str, height: int, width: int, rng: np.random.Generator) -> PIL.Image.Image:
    size = (width, height)
    if mode == "1":
        return PIL.Image.fromarray(rng.random((height, width)) > 0.5)
    if mode in ("I;16", "I", "F"):
        array = {"I;16": lambda: rng.integers(0, 65536, (height, width), dtype=np.uint16),
                 "I": lambda: rng.integers(-(2**31), 2**31, (height, width), dtype=np.int32),
                 "F": lambda: (rng.standard_normal((height, width)) * 10 ** rng.uniform(-3, 6)).astype(np.float32)}[mode]()
        image = PIL.Image.fromarray(array)
        assert image.mode == mode
        return image
    channels = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    image = PIL.Image.frombytes(mode, size, rng.integers(0, 256, height * width * channels, dtype=np.uint8).tobytes())
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


def array_image(dtype: str, layout: str, channels: int, height: int, width: int, rng: np.random.Generator,
                scale: float) -> np.ndarray:
    shape = {"HW": (height, width), "HWC": (height, width, channels), "CHW": (channels, height, width)}[layout]
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == "float32":
        return (rng.uniform(-0.2, 1.2, shape) * scale).astype(np.float32)
    return rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


@st.composite
def any_image(draw, kinds=("pil", "numpy", "torch"), layouts=("HWC", "CHW")):
    height, width = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(kinds))
    if kind == "pil":
        return pil_image(draw(st.sampled_from(PIL_MODES)), height, width, rng)
    array = array_image(draw(st.sampled_from(["uint8", "uint16", "float32", "bool"])), draw(st.sampled_from(layouts)),
                        draw(st.sampled_from([1, 3, 4])), height, width, rng, draw(st.sampled_from([1.0, 255.0, 1e6])))
    return torch.from_numpy(array) if kind == "torch" else array


@settings(max_examples=40, deadline=None)
@given(images=st.lists(any_image(), min_size=1, max_size=3))
def test_processor_takes_any_image_kind_size_and_layout(images):
    assert_unit_range_batch(pixel_values(images), len(images))


@settings(max_examples=40, deadline=None)
@given(images=st.lists(any_image(kinds=("numpy", "torch"), layouts=("HW",)), min_size=1, max_size=3))
def test_processor_takes_two_dimensional_arrays_and_tensors(images):
    assert_unit_range_batch(pixel_values(images), len(images))


@st.composite
def logits_and_sizes(draw):
    batch, channels = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2]))
    height, width = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1e4]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    logits = (torch.from_numpy(rng.standard_normal((batch, channels, height, width)).astype(np.float32)) * scale).to(dtype)
    sizes = draw(st.one_of(st.none(), st.lists(st.tuples(st.integers(1, 80), st.integers(1, 80)),
                                                 min_size=batch, max_size=batch)))
    if sizes is not None and draw(st.booleans()):
        sizes = torch.tensor(sizes)  # as in `target_sizes=torch.tensor([image.size[::-1] for image in images])`
    return logits, sizes


@settings(max_examples=40, deadline=None)
@given(case=logits_and_sizes(), threshold=st.floats(0.01, 0.99), as_dict=st.booleans())
def test_post_processing_gives_binary_masks_of_the_target_size(case, threshold, as_dict):
    from transformers.modeling_outputs import SemanticSegmenterOutput

    logits, sizes = case
    outputs = {"logits": logits} if as_dict else SemanticSegmenterOutput(logits=logits)
    masks = processor().post_process_semantic_segmentation(outputs, target_sizes=sizes, threshold=threshold)
    assert len(masks) == len(logits)
    for index, mask in enumerate(masks):
        expected = tuple(int(s) for s in sizes[index]) if sizes is not None else tuple(logits.shape[-2:])
        assert tuple(mask.shape) == expected
        assert mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1}
        if sizes is None and logits.shape[1] == 1:
            assert torch.equal(mask, (logits[index, 0].float().sigmoid() > threshold).long())


def exif_jpeg(orientation: int) -> bytes:
    """A 40x20 (width x height) frame, red in its top-left quarter and blue in its bottom-right, tagged to be shown
    rotated."""
    frame = np.zeros((20, 40, 3), dtype=np.uint8)
    frame[:10, :20] = (255, 0, 0)
    frame[10:, 20:] = (0, 0, 255)
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    PIL.Image.fromarray(frame).save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize(("orientation", "red_corner"), [(6, "top_right"), (8, "bottom_left")])
def test_exif_orientation_is_applied(orientation, red_corner):
    from image_processing_attention_unet import to_rgb_uint8

    data = exif_jpeg(orientation)
    stored = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))  # the frame as stored, EXIF ignored
    shown = to_rgb_uint8(PIL.Image.open(io.BytesIO(data)))
    assert stored.shape == (20, 40, 3) and shown.shape == (40, 20, 3)
    corners = {"top_left": shown[2, 2], "top_right": shown[2, -3], "bottom_left": shown[-3, 2],
               "bottom_right": shown[-3, -3]}
    red = [name for name, pixel in corners.items() if pixel[0] > 200 and pixel[2] < 60]
    assert red == [red_corner]
    from_file = pixel_values(PIL.Image.open(io.BytesIO(data)))
    assert torch.equal(from_file, pixel_values(PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(data)))))
    assert not torch.allclose(from_file, pixel_values(stored), atol=0.5)


@pytest.mark.parametrize("image", [
    *[pytest.param(mode, id=f"pil_{mode}") for mode in PIL_MODES],
    *[pytest.param((dtype, layout), id=f"numpy_{dtype}_{layout}")
      for dtype in ("uint8", "uint16", "float32", "bool") for layout in ("HW", "HWC", "CHW")],
])
def test_one_pixel_images(image):
    rng = np.random.default_rng(0)
    if isinstance(image, str):
        image = pil_image(image, 1, 1, rng)
    else:
        image = array_image(*image[:2], 3, 1, 1, rng, 1.0)
    assert_unit_range_batch(pixel_values(image), 1)
    (mask,) = processor().post_process_semantic_segmentation({"logits": torch.randn(1, 1, 256, 256)},
                                                             target_sizes=[(1, 1)])
    assert mask.shape == (1, 1)


def test_non_finite_float_image_is_a_clear_error():
    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    image[3, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_values(image)


def peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size (Linux)
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_a_24_megapixel_photo_is_processed_with_bounded_memory():
    image = PIL.Image.fromarray(np.broadcast_to((np.arange(6000) % 251).astype(np.uint8)[None, :, None],
                                                (4000, 6000, 3)).copy())
    image_bytes = 6000 * 4000 * 3
    measured = peak_rss_reset()
    before = peak_rss_bytes() if measured else 0
    values = pixel_values(image)
    assert_unit_range_batch(values, 1)
    if measured:
        extra = peak_rss_bytes() - before
        # About 4.6x the image today (exif_transpose and RGB copies, the array, the resize's PIL round trip); a
        # float64 copy of the full-size image alone would be 8x.
        assert extra < 8 * image_bytes, f"peak memory grew by {extra / 2**20:.0f} MiB for a {image_bytes / 2**20:.0f} MiB image"

