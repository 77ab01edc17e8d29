"""Headless Chromium for the UI tests: the system's Chromium (Debian's `chromium`) driven by playwright.

No browser is downloaded: playwright launches the executable the system package installed. In CI
(``CI`` set, as .ci/run runs) a missing Chromium or playwright fails the test with what to install; on a
developer machine it skips, naming the same install step, because the UI tests need a system package the
project's venv cannot bring.

Every page a test looks at is kept as a screenshot in the browser artifacts folder: ``VLGRPO_BROWSER_ARTIFACTS``
if set, else ``browser/`` under pytest's temporary folder of the session; the test prints each path, and a
failing check names its screenshot in the failure message.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get install -y chromium (Debian) and pip install playwright (pinned in requirements.lock)"


def chromium_executable() -> str:
    path = os.environ.get("VLGRPO_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if path is None:
        _missing(f"no Chromium found ({', '.join(CHROMIUM_NAMES)} on PATH, or VLGRPO_CHROMIUM)")
    return path


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}: CI must install it ({INSTALL}; .ci/run does)", pytrace=False)
    pytest.skip(f"{what}; install: {INSTALL}")


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium browser (playwright ``Browser``)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    exe = chromium_executable()
    with sync_playwright() as pw:
        # --no-sandbox: the suite runs as root in CI, where Chromium's sandbox refuses to start.
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


class Shots:
    """Screenshots of the pages a test looked at, in one folder; ``keep`` returns the file's path."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def keep(self, page: object, name: str) -> Path:
        path = self.folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


def artifacts_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("VLGRPO_BROWSER_ARTIFACTS")
    return Path(env) if env else tmp_path_factory.getbasetemp() / "browser"


def images_loaded(frame: object, selector: str = "img") -> tuple[int, list[str]]:
    """How many ``<img>`` in ``frame`` finished loading with pixels, and the sources of those that did not."""
    return frame.evaluate("""sel => {
        const imgs = Array.from(document.querySelectorAll(sel));
        const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => (i.currentSrc || i.src).slice(0, 120));
        return [imgs.length - bad.length, bad];
    }""", selector)
