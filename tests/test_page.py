"""The web page at GET / in a real browser: Debian's chromium, headless, driven by selenium through Debian's
chromedriver (scripts/install_deploy_deps.sh installs both), against the real app serving the demo model.

Chromium starts once for the module; each check uploads at most one file. Pixels are read back from the
canvas with getImageData and compared with the image and with service/overlay.py's rule.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.client import SegmentClient
from service.overlay import HIGHLIGHT_ALPHA, MASK_ALPHA, blend_masks, class_colour, draw
from service.page.routes import STATIC_DIR
from tests.conftest import DEMO_MAX_UPLOAD, KnownImage
from tests.helpers import assert_found, assert_overlay, drawing_zones

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless as root in a container; the last four keep chromium from calling home on a closed network.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--no-proxy-server", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps")
WAIT_S = 120  # an upload waits for CPU inference on a machine shared with other test runs
# getImageData of the canvas as base64 (in chunks: String.fromCharCode takes a bounded argument list).
READ_CANVAS = """
const canvas = document.querySelector("canvas#overlay");
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let text = "";
for (let i = 0; i < data.length; i += 0x8000) text += String.fromCharCode.apply(null, data.subarray(i, i + 0x8000));
return [canvas.width, canvas.height, btoa(text)];
"""
# The page's own decodeMask and blendMask (alpha 256: the mask's pixels become 255) over a blank image.
RASTERIZE = """
const [rle, width, height] = arguments;
const data = new Uint8ClampedArray(width * height * 4);
blendMask(data, width, height, decodeMask(rle, width, height), [255, 255, 255], 256);
const mask = new Uint8Array(width * height);
for (let i = 0; i < mask.length; i += 1) mask[i] = data[4 * i];
let text = "";
for (let i = 0; i < mask.length; i += 0x8000) text += String.fromCharCode.apply(null, mask.subarray(i, i + 0x8000));
return btoa(text);
"""


@contextlib.contextmanager
def chromium(window_size: str = "1100,860") -> Iterator:
    """Debian's chromium, headless, driven through its chromedriver (the test is skipped without them); also
    tests/test_label_studio.py's browser."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/install_deploy_deps.sh)")
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # both paths given: Selenium Manager looks nothing up, downloads nothing
    for flag in (*CHROMIUM_FLAGS, f"--window-size={window_size}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def driver() -> Iterator:
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def page(driver, demo_server):
    """The page, loaded, with the model described and the class toggles built."""
    driver.get(f"{demo_server.url}/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#classes input"))
    assert console_errors(driver) == []
    return driver


def console_errors(driver) -> list[str]:
    """The browser console's errors since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def canvas_pixels(driver) -> np.ndarray:
    width, height, data = driver.execute_script(READ_CANVAS)
    rgba = np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)
    assert (rgba[:, :, 3] == 255).all()
    return rgba[:, :, :3]


def items(driver) -> list[str]:
    return [li.text.splitlines()[0] for li in driver.find_elements(By.CSS_SELECTOR, "ul#detections li")]


def segment_requests(server) -> float:
    """POST /segment requests the server has answered (its mrcnn_requests_total, all statuses)."""
    families = server.app.state.pipeline.metrics.requests.collect()
    return sum(s.value for f in families for s in f.samples if s.name.endswith("_total"))


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_page_files_are_served_outside_the_api_and_its_metrics(demo_server) -> None:
    before = segment_requests(demo_server)
    status, headers, body = get(f"{demo_server.url}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="overlay"' in body and "default-src 'self'" in headers["content-security-policy"]
    for name in sorted(p.name for p in STATIC_DIR.iterdir()):
        assert get(f"{demo_server.url}/static/{name}")[0] == 200
    status, _, body = get(f"{demo_server.url}/page.json")
    settings = json.loads(body)
    assert settings["score_threshold"] == 0.05 and settings["default_score"] == 0.5
    assert settings["style"]["palette"][0]["fill"] == list(class_colour(1))
    assert get(f"{demo_server.url}/static/missing.js")[:1] == (404,)
    paths = json.loads(get(f"{demo_server.url}/openapi.json")[2])["paths"]
    assert not {"/", "/page.json"} & set(paths) and not any(p.startswith("/static") for p in paths)
    assert segment_requests(demo_server) == before
    # pyproject.toml ships service/page/static/* in the package (no subfolders, which that pattern would miss)
    assert all(p.is_file() for p in STATIC_DIR.iterdir())


@pytest.mark.browser
def test_rle_decoder_keeps_holes(page) -> None:
    """The page's COCO RLE decoder and rasterizer against pycocotools' encoder: a ring (a hole), separate
    parts, the first and the last pixel, and counts long enough for several 5-bit groups and negative
    differences."""
    from pycocotools import mask as mask_utils

    height, width = 300, 700
    yy, xx = np.mgrid[:height, :width]
    r2 = (yy - 150) ** 2 + (xx - 200) ** 2
    mask = ((r2 < 120**2) & (r2 > 50**2)) | ((xx > 450) & (xx < 690) & (yy > 20) & (yy < 280))
    mask[:, 560:580] = False  # a part split in two
    mask[0, 0] = mask[-1, -1] = True
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    drawn = np.frombuffer(base64.b64decode(page.execute_script(RASTERIZE, rle, width, height)), np.uint8)
    assert np.array_equal(drawn.reshape(height, width) == 255, mask)
    assert console_errors(page) == []


@pytest.mark.browser
def test_upload_draws_masks_filters_and_highlights(
    page, demo_server, shapes_image: KnownImage, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = shapes_image.image
    height, width = image.shape[:2]
    page.find_element(By.CSS_SELECTOR, "input#image").send_keys(str(shapes_image.path))
    WebDriverWait(page, WAIT_S).until(lambda d: items(d))
    # What the page was given, asked again through the Python client: the same file, the same options.
    everything = SegmentClient(demo_server.url, timeout=600).segment(shapes_image.path, score_threshold=0.05)
    shown = [d for d in everything if d.score > 0.5]  # the slider starts at the server's default, 0.5
    assert items(page) == [f"{d.label} {d.score:.2f}" for d in shown]
    masks = np.stack([d.mask for d in shown])
    assert_found(shapes_image.masks, shapes_image.labels, masks, np.array([d.class_id for d in shown]))
    colours = [class_colour(d.class_id) for d in shown]
    alphas = [MASK_ALPHA] * len(shown)
    requests = segment_requests(demo_server)

    # With boxes and labels: mask pixels tinted, pixels far from every mask, box and label the image's own.
    pixels = canvas_pixels(page)
    assert pixels.shape == image.shape
    assert_overlay(pixels, image, masks, colours, alphas, exclude=drawing_zones([d.box for d in shown], width, height))
    # Masks alone: exactly the rule, everywhere, and the very pixels the Python overlay draws.
    boxes = page.find_element(By.CSS_SELECTOR, "input#boxes")
    boxes.click()
    pixels = canvas_pixels(page)
    assert_overlay(pixels, image, masks, colours, alphas)
    assert np.array_equal(pixels, draw(image, shown, boxes=False))

    # Hovering a detection in the list draws its mask on top, more opaque.
    first = page.find_element(By.CSS_SELECTOR, "ul#detections li")
    ActionChains(page).move_to_element(first).perform()
    others = blend_masks(image, shown[1:])
    assert np.array_equal(canvas_pixels(page), blend_masks(others, shown[:1], HIGHLIGHT_ALPHA))
    ActionChains(page).move_to_element(page.find_element(By.TAG_NAME, "h1")).perform()
    assert np.array_equal(canvas_pixels(page), pixels)

    # A class toggled off leaves the list and the canvas.
    toggle = page.find_element(By.CSS_SELECTOR, "#classes input[value='square']")
    toggle.click()
    assert items(page) == [f"{d.label} {d.score:.2f}" for d in shown if d.label != "square"]
    assert np.array_equal(canvas_pixels(page), blend_masks(image, [d for d in shown if d.label != "square"]))
    toggle.click()

    # The slider at its top hides everything; at its bottom (the requested threshold) shows every detection.
    slider = page.find_element(By.CSS_SELECTOR, "input#score")
    slider.send_keys(Keys.END)
    assert items(page) == [] and np.array_equal(canvas_pixels(page), image)
    slider.send_keys(Keys.HOME)
    assert items(page) == [f"{d.label} {d.score:.2f}" for d in everything if d.score > 0.05]
    assert len(everything) > len(shown)
    assert segment_requests(demo_server) == requests, "filtering sent a request"

    # Back to the first view, with boxes, for the screenshot.
    page.execute_script("const s = arguments[0]; s.value = '0.5'; s.dispatchEvent(new Event('input'));", slider)
    boxes.click()
    assert len(items(page)) == len(shown)
    timings = page.find_element(By.ID, "timings").text
    assert "inference" in timings and "total" in timings and " ms" in timings
    assert page.find_element(By.ID, "model").text.startswith("shapes-demo 0.2")
    shot = Path(os.environ.get("MRCNN_PAGE_SCREENSHOT") or tmp_path_factory.mktemp("page") / "page.png")
    assert page.save_screenshot(str(shot)) and shot.stat().st_size > 0
    assert console_errors(page) == []


@pytest.mark.browser
def test_oversized_file_shows_the_servers_413_message(page, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(0).bytes(DEMO_MAX_UPLOAD + 1))
    page.find_element(By.CSS_SELECTOR, "input#image").send_keys(str(big))
    error = page.find_element(By.ID, "error")
    WebDriverWait(page, WAIT_S).until(lambda d: error.is_displayed())
    # the server's message, about the multipart body: the file plus its part headers
    assert re.fullmatch(rf"413: the body has \d+ bytes, more than {DEMO_MAX_UPLOAD}", error.text), error.text
    assert items(page) == [] and page.execute_script("return document.querySelector('canvas#overlay').width") == 0
    # The only console error is the browser's own note of the refused request.
    (logged,) = console_errors(page)
    assert "/segment" in logged and "413" in logged


@pytest.mark.browser
def test_the_tiling_toggle_sends_the_image_again_with_tiles_auto(page, tmp_path: Path) -> None:
    from tests.helpers import encode
    from tests.large_scene import large_scene

    path = tmp_path / "large.jpg"  # shrunk 7.5 times by the policy: its shapes are too small for the model
    path.write_bytes(encode(large_scene(5, (2400, 3200), count=20).image, "JPEG", quality=90))
    page.find_element(By.CSS_SELECTOR, "input#image").send_keys(str(path))
    timings = page.find_element(By.ID, "timings")
    WebDriverWait(page, WAIT_S).until(lambda d: "total" in timings.text)
    assert "tiles" not in timings.text
    untiled = items(page)
    toggle = page.find_element(By.CSS_SELECTOR, "input#tiles")
    toggle.click()
    WebDriverWait(page, WAIT_S).until(lambda d: "· 30 tiles" in timings.text)
    assert len(items(page)) >= 18 > len(untiled)
    toggle.click()
    WebDriverWait(page, WAIT_S).until(lambda d: "total" in timings.text and "tiles" not in timings.text)
    assert items(page) == untiled
    assert console_errors(page) == []


def test_the_page_asks_for_the_api_key(driver, shapes_image: KnownImage) -> None:
    """With keys on the server, the page (open) asks for a key, shows the server's 401 message for a wrong one,
    and with the right one describes the model and draws the masks of an upload."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings
    from tests.helpers import ServerThread

    key = "page-key-0123456789"
    settings = Settings(model_path=DEFAULT_MODEL_PATH, api_keys=key, max_upload_bytes=DEMO_MAX_UPLOAD,
                        request_timeout_s=600)
    with ServerThread(create_app(settings)) as server:
        driver.get(f"{server.url}/")
        wait = WebDriverWait(driver, WAIT_S)
        wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        assert "an API key is required" in driver.find_element(By.ID, "error").text
        field = driver.find_element(By.ID, "api-key")
        field.send_keys("not-the-key" + Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "error").text == "401: the API key is not valid")
        assert driver.find_element(By.ID, "key-form").is_displayed()
        field.clear()
        field.send_keys(key + Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#classes input"))
        assert not driver.find_element(By.ID, "key-form").is_displayed()
        assert not driver.find_element(By.ID, "error").is_displayed()
        driver.find_element(By.CSS_SELECTOR, "input#image").send_keys(str(shapes_image.path))
        wait.until(lambda d: items(d))
        pixels = canvas_pixels(driver)
        assert pixels.shape == shapes_image.image.shape and not np.array_equal(pixels, shapes_image.image)
        assert all("401 (Unauthorized)" in e for e in console_errors(driver))  # the refusals, nothing else
