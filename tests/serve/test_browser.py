"""The web UI in a real browser: Debian's chromium, headless, driven by Selenium through the
system chromedriver (no browser download), against one server per module (the bundled model, a
token: the browser logs in once at the login form, the session cookie carries the UI's own calls).
Per tab: txt2img with a ControlNet unit (upload enables it, Control Type sets canny, the gallery's
files are the PNGs saved with their parameters), live progress and Interrupt, the Hires. fix,
img2img with a drawn inpaint mask, PNG Info's round trip. Screenshots go under each test's tmp_path.
Skipped where no chromium / chromedriver is installed (``.ci/run`` installs them)."""

from __future__ import annotations

import datetime
import re
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

TOKEN = "browser-s3cret"
pytestmark = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                reason="needs Debian's chromium and chromium-driver (apt)")


@pytest.fixture(scope="module")
def server():
    import socket

    import uvicorn

    from controlstack.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ui=True, token=TOKEN)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    deadline = time.time() + 120
    while not srv.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/", app
    srv.should_exit = True


@pytest.fixture(scope="module")
def driver(server):
    """One chromium for the module, logged in with the token (no cookie: the login form first)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(flag)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        d.get(server[0])
        WebDriverWait(d, 60).until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[name=token]"))) \
            .send_keys(TOKEN, Keys.ENTER)
        WebDriverWait(d, 60).until(EC.presence_of_element_located((By.ID, "generate")))
        assert d.current_url == server[0]
        yield d
    finally:
        d.quit()


class Page:
    """The UI's widgets by their elem_id, for one test (the page reloaded: every widget at its default)."""

    def __init__(self, driver, url):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.By = driver, By
        driver.get(url)
        self.wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        self.wait.until(lambda d: d.find_elements(By.ID, "generate"))

    def css(self, selector):
        return self.d.find_element(self.By.CSS_SELECTOR, selector)

    def value(self, selector) -> str:
        return self.css(selector).get_attribute("value") or ""

    def set_number(self, elem_id, value):
        from selenium.webdriver.common.keys import Keys

        box = self.css(f"#{elem_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)
        self.wait.until(lambda d: self.value(f"#{elem_id} input[type=number]") == str(value))

    def button(self, text):
        """The visible button whose text starts with ``text`` (an accordion's carries its arrow too)."""
        found = [b for b in self.d.find_elements(self.By.TAG_NAME, "button")
                 if b.is_displayed() and b.text.strip().startswith(text)]
        assert found, f"no visible button {text!r}"
        return found[0]

    def upload(self, elem_id, path):
        self.wait.until(lambda d: d.find_elements(self.By.CSS_SELECTOR, f"#{elem_id} input[type=file]"))
        self.css(f"#{elem_id} input[type=file]").send_keys(str(path))

    def generate(self, timeout=60) -> str:
        """Click Generate; the parameters text once the job is done (its first line the job id)."""
        from selenium.webdriver.support.ui import WebDriverWait

        before = self.value("#parameters textarea")
        self.css("#generate").click()
        WebDriverWait(self.d, timeout, poll_frequency=0.05).until(
            lambda d: "Steps:" in self.value("#parameters textarea") and self.value("#parameters textarea") != before)
        return self.value("#parameters textarea")


def saved(app, kind: str, job_text: str):
    """The PNG the UI saved for the job (outputs beside the job store), loaded."""
    seed = re.search(r"Seed: (\d+)", job_text).group(1)
    day = app.state.jobs.store.root / "outputs" / f"{kind}-images" / datetime.date.today().isoformat()
    path = max(day.glob(f"*-{seed}.png"))  # the latest of that seed
    with Image.open(path) as im:
        im.load()
        return im.copy()


def test_txt2img_with_a_unit_saves_pngs_with_their_parameters(server, driver, tmp_path):
    url, app = server
    photo = np.zeros((128, 128, 3), np.uint8)
    photo[32:96, 32:96] = (200, 40, 40)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    page = Page(driver, url)
    page.upload("unit0-image", tmp_path / "photo.png")
    page.wait.until(lambda d: page.css("#unit0-enable input").is_selected())  # uploading enabled the unit
    page.css("#unit0-type input[value='Canny']").click()  # Control Type: the canny pair
    page.wait.until(lambda d: "ControlNet Unit 0 [Canny]" in page.css("#unit0").text)
    page.wait.until(lambda d: "Low threshold" in page.css("#unit0").text)  # canny's own sliders shown
    page.set_number("steps", 4)
    text = page.generate()
    assert re.match(r"job-\d+\n", text) and "Module: canny, Model: canny" in text
    assert "Resize Mode: Crop and Resize" in text
    # the gallery shows the saved PNG (not a WebP re-encoding), which carries the same parameters
    srcs = [img.get_attribute("src") for img in driver.find_elements(page.By.CSS_SELECTOR, "#gallery img")]
    assert srcs and all(s.endswith(".png") for s in srcs)
    png = saved(app, "txt2img", text)
    assert png.info["parameters"] == text.split("\n", 1)[1] and png.size == (128, 128)
    driver.save_screenshot(str(tmp_path / "txt2img.png"))
    assert (tmp_path / "txt2img.png").stat().st_size > 10_000


def test_progress_is_live_and_interrupt_stops_the_run(server, driver, tmp_path):
    url, app = server
    page = Page(driver, url)
    page.set_number("steps", 150)
    page.css("#generate").click()
    seen = {}

    def mid_run(d):  # gradio's progress over the outputs: "job-N step k/150"
        m = re.search(r"(job-\d+) step (\d+)/150", page.css("#parameters").text)
        if m and 0 < int(m.group(2)) < 150:
            seen.update(job=m.group(1), step=int(m.group(2)))
        return bool(seen)

    page.wait.until(mid_run)
    driver.save_screenshot(str(tmp_path / "progress.png"))
    page.css("#interrupt").click()
    started = time.time()
    page.wait.until(lambda d: "Steps: 150" in page.value("#parameters textarea"))
    record = app.state.jobs.get(seen["job"])
    # stopped after the step it was on, done with the partial image (sd-webui's Interrupt)
    assert record["status"] == "done" and seen["step"] <= record["progress"][0] < 150 and len(record["images"]) == 1
    assert time.time() - started < 5
    assert page.value("#parameters textarea").startswith(seen["job"])


def test_hires_fix_doubles_the_size(server, driver, tmp_path):
    url, app = server
    page = Page(driver, url)
    page.button("Hires. fix").click()
    page.wait.until(lambda d: page.css("#hires input").is_displayed())
    page.css("#hires input").click()
    page.set_number("steps", 3)
    text = page.generate()
    assert "Hires upscale: 2" in text and "Size: 128x128" in text  # sd-webui's Size: the first pass's
    assert saved(app, "txt2img", text).size == (256, 256)
    driver.save_screenshot(str(tmp_path / "hires.png"))


def test_img2img_inpaints_only_the_drawn_region(server, driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    url, app = server
    Image.new("RGB", (128, 128), (40, 90, 200)).save(tmp_path / "init.png")
    page = Page(driver, url)
    page.button("img2img / inpaint").click()
    page.upload("img2img-image", tmp_path / "init.png")
    canvas = page.wait.until(lambda d: d.find_elements(page.By.CSS_SELECTOR, "#img2img-image canvas"))[0]
    time.sleep(0.5)  # the editor lays the image out before it takes strokes
    size = canvas.size
    ActionChains(driver).move_to_element_with_offset(canvas, -size["width"] // 8, -size["height"] // 8) \
        .click_and_hold().move_by_offset(size["width"] // 4, 0).move_by_offset(0, size["height"] // 4) \
        .release().perform()
    page.set_number("steps", 4)
    text = page.generate()
    assert "Denoising strength: 0.75" in text
    spec = app.state.jobs.store.spec(text.split("\n", 1)[0])
    mask = np.asarray(spec.inpaint_mask) > 0
    assert spec.init_image.size == (128, 128) and 0 < mask.mean() < 0.5 and mask[64, 64]  # the stroke, centred
    assert spec.inpaint.paste_back and spec.inpaint.mask_blur == 4 and spec.inpaint.fill == "original"
    out = np.asarray(saved(app, "img2img", text).convert("RGB"))
    assert (out[2, 2] == (40, 90, 200)).all()  # far from the stroke: the init image's pixels, pasted back
    driver.save_screenshot(str(tmp_path / "img2img.png"))


def test_png_info_sends_the_parameters_to_txt2img(server, driver, tmp_path):
    from controlstack.io.png import atomic_save

    url, _ = server
    params = {"prompt": "a blue ball", "negative_prompt": "dark", "steps": 33, "scheduler": "euler_a", "cfg": 5.5,
              "seed": 4242, "width": 192, "height": 96, "model": "x"}
    atomic_save(Image.new("RGB", (192, 96)), tmp_path / "made.png", params)
    page = Page(driver, url)
    page.button("PNG Info").click()
    page.upload("pnginfo-image", tmp_path / "made.png")
    page.wait.until(lambda d: "Seed: 4242" in page.value("#pnginfo-text textarea"))
    page.button("Send to txt2img").click()
    page.wait.until(lambda d: page.value("#prompt textarea") == "a blue ball")
    assert page.value("#negative textarea") == "dark" and page.value("#seed input") == "4242"
    assert [page.value(f"#{k} input[type=number]") for k in ("steps", "width", "height")] == ["33", "192", "96"]
    assert "Euler a" in page.value("input[aria-label='Sampling method']")
    assert page.css("button[role=tab][aria-selected=true]").text == "txt2img"
    driver.save_screenshot(str(tmp_path / "pnginfo.png"))
