"""The Gradio demo (`app.py`) served on loopback with the shipped weights: a real headless Chromium (Debian's, driven by
Playwright) uploads a frame and sees its overlay, and a bad upload's message; `gradio_client` gets the mask
`predict.py` writes. Without Chromium the browser tests skip, except under CI (`CI=true`), where `.ci/run` installs
it and its absence fails them."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from polyp_segmentation.testing import REPO_ROOT

pytestmark = pytest.mark.slow

EXAMPLE = sorted((REPO_ROOT / "examples").glob("*.jpg"))[0]
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, "app.py", "--server_name", "127.0.0.1", "--server_port", str(port),
                                   "--float32_matmul_precision", "medium"],
                                  cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                pytest.fail(f"app.py exited with status {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on {url} within 300 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        assert url.rstrip("/") in log.read_text(), "app.py does not print its address"
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def page(app_url):
    if CHROMIUM is None:
        message = "Chromium not found (apt-get install chromium, or set CHROMIUM_PATH)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must have it.")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(app_url)
        yield page
        browser.close()


def upload(page, path: Path) -> None:
    page.locator("input[type=file]").first.set_input_files(str(path))


def shown_image(page, selector: str) -> PIL.Image.Image:
    image = page.locator(f"{selector} img").first
    image.wait_for(state="visible", timeout=240_000)
    page.wait_for_function("(e) => e.complete && e.naturalWidth > 0", arg=image.element_handle(), timeout=60_000)
    data = page.request.get(image.get_attribute("src")).body()
    return PIL.Image.open(io.BytesIO(data)).convert("RGB")


def test_browser_upload_shows_the_overlay_at_the_frame_size_with_the_polyp_marked(page):
    upload(page, EXAMPLE)
    overlay = shown_image(page, "#overlay")
    frame = PIL.Image.open(EXAMPLE).convert("RGB")
    assert overlay.size == frame.size
    changed = np.abs(np.asarray(overlay, dtype=int) - np.asarray(frame, dtype=int)).max(axis=-1) > 8
    assert changed.mean() > 0.01, "no polyp pixel is marked in the overlay"
    outline = (np.asarray(overlay) == (0, 255, 0)).all(axis=-1)
    assert outline.sum() > 50, "the mask's outline is not drawn"
    assert "% of the frame" in page.locator("#frame-summary").inner_text()


def test_browser_examples_are_pictures_with_and_without_polyps_and_a_click_segments_one(page):
    from app import EXAMPLES

    pictures = page.locator("#examples img")
    pictures.first.wait_for(state="visible", timeout=60_000)
    assert pictures.count() == len(EXAMPLES)
    captions = page.locator("#examples").inner_text()
    assert "polyp-free" in captions and "with a polyp" in captions
    polyp_free = [index for index, path in enumerate(EXAMPLES) if path.stem.startswith("nopolyp")]
    pictures.nth(polyp_free[0]).click()
    summary = page.locator("#frame-summary")
    summary.get_by_text("score").wait_for(timeout=240_000)
    assert "(score " in summary.inner_text()


def test_browser_bad_upload_shows_a_message_and_the_app_keeps_serving(page, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is not an image")
    upload(page, bad)
    message = page.locator("#frame-summary .upload-problem")
    message.wait_for(timeout=120_000)
    assert "Cannot read not_an_image.png as an image" in message.inner_text()
    page.reload()
    upload(page, EXAMPLE)
    assert shown_image(page, "#overlay").size == PIL.Image.open(EXAMPLE).size


def test_api_returns_the_mask_predict_py_writes(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    overlay, probability, gates, mask, summary = client.predict(
        handle_file(str(EXAMPLE)), 0.5, False, api_name="/segment_frame"
    )
    app_mask = np.asarray(PIL.Image.open(mask).convert("L")) > 127
    completed = subprocess.run([sys.executable, "predict.py", str(EXAMPLE), "--model", ".", "--threshold", "0.5",
                                "--float32_matmul_precision", "medium", "--output_dir", str(tmp_path)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    predicted = np.asarray(PIL.Image.open(tmp_path / f"{EXAMPLE.stem}_mask.png")) > 127
    assert app_mask.shape == predicted.shape and app_mask.any()
    np.testing.assert_array_equal(app_mask, predicted)
    assert len(gates) == 3 and "% of the frame" in summary  # convnext_tiny: skips at strides 16, 8 and 4


def test_api_video_tab_segments_a_clip_and_names_a_bad_file(app_url, kvasir_root, tmp_path):
    import csv

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from test_video import CLIP_FRAMES, write_clip

    client = Client(app_url, verbose=False)
    clip = write_clip(kvasir_root, tmp_path / "clip.mp4")
    video, table, summary = client.predict(handle_file(str(clip)), 2, 0.5, False, api_name="/segment_video")
    with open(table, newline="") as file:
        assert [int(row["frame_index"]) for row in csv.DictReader(file)] == list(range(0, CLIP_FRAMES, 2))
    assert f"{CLIP_FRAMES} frames" in summary and "frames/s" in summary
    assert Path(video["video"] if isinstance(video, dict) else video).stat().st_size > 0

    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])
    _, _, summary = client.predict(handle_file(str(damaged)), 1, 0.5, False, api_name="/segment_video")
    assert "Cannot read damaged.mp4 as a video" in summary
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    with pytest.raises(AppError, match="Invalid file type.*mp4"):  # refused by the upload's own file-type check
        client.predict(handle_file(str(text)), 1, 0.5, False, api_name="/segment_video")
    assert client.predict(handle_file(str(EXAMPLE)), 0.5, False, api_name="/segment_frame")[3]  # still serving
