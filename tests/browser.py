"""Headless Debian Chromium driven by Selenium, for the tests that open our web pages."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver); .ci/run installs them where it can")


def chromium(width: int = 1000, height: int = 800, webgl: bool = False):
    """A new headless Chromium (quit it when done). ``webgl``: software WebGL (SwiftShader),
    for pages that draw with it (the viser viewer)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    args = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
            f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update"]
    if webgl:
        args += ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    for arg in args:
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    return driver
