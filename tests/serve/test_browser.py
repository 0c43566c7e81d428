"""The web UI in a real browser: Debian's chromium, headless, driven by Selenium through the
system chromedriver (no browser download). The server has a token: the browser is sent to the login
form, logs in (the session cookie carries the UI's own calls), uploads an image, runs canny in unit
0, generates with the bundled model -- a job of the server's queue -- and checks that the gallery
shows an image and the parameters name the job; saves a screenshot.
Skipped where no chromium / chromedriver is installed (``.ci/run`` installs them)."""

from __future__ import annotations

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
    srv = uvicorn.Server(uvicorn.Config(create_app(ui=True, token=TOKEN), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    deadline = time.time() + 120
    while not srv.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True


def test_upload_canny_generate_in_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    photo = np.zeros((128, 128, 3), np.uint8)
    photo[32:96, 32:96] = (200, 40, 40)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(server)  # no cookie yet: the login form
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[name=token]"))).send_keys(TOKEN, Keys.ENTER)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        assert driver.current_url == server
        driver.find_elements(By.CSS_SELECTOR, "input[type=file]")[0].send_keys(str(tmp_path / "photo.png"))
        time.sleep(2)
        driver.find_elements(By.CSS_SELECTOR, "input[data-testid=checkbox]")[0].click()  # unit 0: Enable
        for label in ("Preprocessor", "Model"):
            box = driver.find_elements(By.CSS_SELECTOR, f"input[aria-label='{label}']")[0]
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.BACKSPACE)
            box.send_keys("canny")
            box.send_keys(Keys.ENTER)
        driver.find_element(By.XPATH, "//button[text()='Preview']").click()
        driver.find_element(By.XPATH, "//button[text()='Generate']").click()

        def parameters(d):
            areas = [a.get_attribute("value") or "" for a in d.find_elements(By.TAG_NAME, "textarea")]
            return next((a for a in areas if "Steps:" in a), "")

        wait.until(lambda d: "Module: canny" in parameters(d))
        assert re.match(r"job-\d+\n", parameters(driver))  # a job of the queue, served by GET /v1/jobs/{id}
        assert driver.find_elements(By.CSS_SELECTOR, ".gallery img, [data-testid='gallery'] img, .grid-wrap img")
        driver.save_screenshot(str(tmp_path / "ui.png"))
        assert (tmp_path / "ui.png").stat().st_size > 10_000
    finally:
        driver.quit()
