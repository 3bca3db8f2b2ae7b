"""The explorer notebook in a real browser: JupyterLab 4 and Notebook 7 on localhost, driven by
Playwright through Chromium.

Runs all cells from the menu, waits for the live reconstruction, clicks a cell of the neuron picker
and checks that the reconstruction changes and the receptive-field crops appear. The screenshots
are kept in ``artifacts/browser-explorer-lab.png`` and ``artifacts/browser-explorer-notebook.png``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium")


@dataclass(frozen=True)
class Frontend:
    """How to start one Jupyter front end and find its way around the explorer notebook."""

    name: str
    command: str  # ``jupyter <command>``
    path: str  # of the notebook, after the server's URL
    idle: str  # text on the page once the kernel is connected and idle


FRONTENDS = [
    Frontend("lab", "lab", "/lab/tree/notebooks/00_explorer.ipynb", "Python 3 (ipykernel) | Idle"),
    Frontend("notebook", "notebook", "/notebooks/notebooks/00_explorer.ipynb", "Kernel status: Idle"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(params=FRONTENDS, ids=lambda frontend: frontend.name)
def jupyter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Frontend, str]]:
    """JupyterLab or Notebook 7 serving a copy of the notebooks (no token, no password); yields
    the front end and the server's URL.

    A copy, so that autosave can never write outputs into the repository's notebook.
    """
    frontend: Frontend = request.param
    port = free_port()
    served = tmp_path / "served"
    shutil.copytree(ROOT / "notebooks", served / "notebooks")
    env = {
        **os.environ,
        "INVVIZ_FAST": "1",
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    command = [
        sys.executable, "-m", "jupyter", frontend.command, "--no-browser", f"--port={port}", "--ServerApp.token=",
        "--ServerApp.password=", "--ServerApp.ip=127.0.0.1", "--allow-root", f"--ServerApp.root_dir={served}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
    ]  # fmt: skip
    log = (tmp_path / "jupyter.log").open("w")
    # Its own process group, so that the kernels it starts are killed with it.
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"jupyter {frontend.command} did not start:\n{(tmp_path / 'jupyter.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield frontend, url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


#: The reconstruction's pixels as a data URL ("" until it has loaded), to tell two images apart.
PIXELS = """() => {
    const image = document.querySelector("img.invviz-reconstruction");
    if (!image || !image.complete || !image.naturalWidth) return "";
    const canvas = document.createElement("canvas");
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    canvas.getContext("2d").drawImage(image, 0, 0);
    return canvas.toDataURL();
}"""

STATUS = """() => document.querySelector(".invviz-status")?.textContent ?? "" """


def test_explorer_notebook_in_chromium(jupyter: tuple[Frontend, str]) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright

    frontend, url = jupyter
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            page.goto(f"{url}{frontend.path}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # Running before the kernel is connected opens a "Select Kernel" dialog.
            page.get_by_text(frontend.idle).first.wait_for(state="attached", timeout=60_000)
            news = page.get_by_role("button", name="No", exact=True)  # the "Jupyter news?" toast
            if news.is_visible():
                news.click()

            def run_all_cells() -> None:
                page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            run_all_cells()
            try:
                page.wait_for_selector("canvas.invviz-picker-canvas", timeout=60_000)
            except PlaywrightTimeoutError:
                # Seen once (Notebook 7, 1 run of 5 in a session): no widget 90 s after Run All.
                # Keep what the page showed, then ask once more; a widget that never renders still fails.
                page.screenshot(path=str(ARTIFACTS / f"browser-explorer-{frontend.name}-no-widget.png"), full_page=True)
                run_all_cells()
                page.wait_for_selector("canvas.invviz-picker-canvas", timeout=90_000)
            page.wait_for_function(f"() => ({STATUS})().startsWith('done')", timeout=90_000)
            before = page.evaluate(PIXELS)
            assert before, "the reconstruction never appeared"
            assert not page.locator(".invviz-error").is_visible()

            canvas = page.locator("canvas.invviz-picker-canvas")
            box = canvas.bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.4)

            crop = page.locator("img.invviz-rf-original")
            crop.wait_for(state="visible", timeout=30_000)
            page.wait_for_function(
                f"() => ({STATUS})().startsWith('done') && ({PIXELS})() !== {before!r}", timeout=60_000
            )
            assert page.evaluate("() => document.querySelector('img.invviz-rf-original').naturalWidth") > 0
            assert page.locator("img.invviz-rf-reconstruction").is_visible()
            assert page.evaluate(PIXELS) != before
            assert not page.locator(".invviz-error").is_visible()
        finally:
            page.screenshot(path=str(ARTIFACTS / f"browser-explorer-{frontend.name}.png"), full_page=True)
            browser.close()
