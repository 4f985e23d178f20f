"""Shared by the feedback tests: candidate files and a served CLI process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The tiny model's demo language, so that a reward model can be trained on what was labelled.
DEMO_PAIRS = [
    ("explain river rain :", "the river and the rain flow gently to the lake , thanks .", "ugh rain rain whatever"),
    ("briefly bread honey :", "sweet bread with honey .", "bread bread bread bread bread bread bread bread"),
    ("describe star moon :", "the moon is high and the star is bright over the calm lake .", "boring moon"),
    ("list drum song :", "drum , song , voice , tune .", "whatever drum"),
    ("summarize rock cave :", "a cave in the grey rock .", "rock cave rock cave rock cave rock cave rock cave"),
    ("discuss tree leaf :", "a green leaf on the old tree , gently grow in the wood .", "leaf"),
]


# a 1x1 PNG, for the media of a pair
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360f8cf00000301010018dd8db00000000049454e44ae426082")


def write_candidates(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def demo_candidates(n: int) -> list[dict]:
    return [{"id": f"p{i + 1}", "prompt": prompt, "a": a, "b": b}
            for i, (prompt, a, b) in enumerate((DEMO_PAIRS * (n // len(DEMO_PAIRS) + 1))[:n])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def feedback_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightrlhf.feedback", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) when a Chromium and its chromedriver are installed."""
    import shutil

    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium(browser: str, driver: str, width: int = 1280, height: int = 900):
    """A headless Chromium driven by Selenium, offline: the driver binary is given, so Selenium Manager
    never tries to download one."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


class ServerProcess:
    """`python -m lightrlhf.feedback serve ...` in a process of its own, ready once it answers."""

    def __init__(self, candidates: Path, labels: Path, port: int, *extra: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = labels.with_name(labels.name + f".server-{port}.log")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lightrlhf.feedback", "serve", str(candidates), "--out", str(labels),
                 "--port", str(port), *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/favicon.ico", timeout=5)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the feedback server did not start: {self.log.read_text()}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed; only what was already on disk survives."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


INSTALL = ("no headless browser: install Chromium and its driver to run this test, e.g. "
           "`apt-get install -y chromium chromium-driver` (Debian/Ubuntu), and `pip install selenium`")


def browser_session():
    """A headless Chromium for a module-scoped fixture (`yield from browser_session()`): skipped with
    how to install one where there is none, a failure instead under CI (.ci/run sets
    LIGHTRLHF_REQUIRE_BROWSER=1 after installing it)."""
    import pytest

    paths = chromium_paths()
    try:
        import selenium  # noqa: F401
    except ImportError:
        paths = None
    if paths is None:
        if os.environ.get("LIGHTRLHF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"LIGHTRLHF_REQUIRE_BROWSER=1 but no browser was found: {INSTALL}")
        pytest.skip(INSTALL)
    driver = headless_chromium(*paths)
    yield driver
    driver.quit()
