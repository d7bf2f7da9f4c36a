"""The widget notebooks in a real browser: JupyterLab on 127.0.0.1, Debian's chromium driven by
playwright through `executable_path` (never a downloaded browser build).

For each notebook with an explorer (02, 05, 09), opened as a fresh clone would be (no trust, a
new workspace):
* on open: not marked modified, no raw `VBox(children=...` text (the controls' text form says to
  run the cell), and the committed picture shows;
* Run All: every cell runs without a traceback;
* every control is moved (sliders dragged with the mouse, dropdowns changed), and after each
  move the explorer's text changed, its picture changed (unless the text says the combination
  cannot be drawn), the picture is not blank, and it is the cell's only picture.

Skipped, with the reason, where chromium or playwright is missing (a laptop); CI sets
MINIPAR_REQUIRE_BROWSER=1 (.ci/run), which turns a skip into a failure. With MINIPAR_SCREENSHOTS=DIR
the explorer of each notebook is photographed before and after its first move.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow  # a real browser and three notebooks: minutes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and os.path.exists(p)
    ),
    None,
)
# (notebook, moves): ("slider", index) drags the index-th slider; ("select", index, option) picks an option
NOTEBOOKS = {
    "02_zero_fsdp": [("slider", 0), ("slider", 1), ("select", 0, 1), ("slider", 2)],
    "05_pipeline_parallel": [
        ("slider", 0),
        ("slider", 1),
        ("select", 0, "dualpipe"),
        ("slider", 6),
        ("slider", 3),
        ("slider", 4),
        ("slider", 5),
        ("select", 0, "interleaved_1f1b"),
        ("slider", 2),
    ],
    "09_planner": [("select", 0, 0), ("select", 1, 1), ("select", 2, 1)],
}


def unavailable() -> str | None:
    """Why this test cannot run here (None: it can). tests/conftest.py asks too, to know whether
    this test will execute the widget notebooks."""
    if CHROMIUM is None:
        return "Debian's chromium is not installed (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -r requirements.txt)"
    return None


def _missing(reason: str):
    if os.environ.get("MINIPAR_REQUIRE_BROWSER"):
        pytest.fail(f"MINIPAR_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving copies of the widget notebooks, as a fresh clone: nothing trusted."""
    if why := unavailable():
        _missing(why)
    root = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:
        shutil.copy(os.path.join(ROOT, "notebooks", name + ".ipynb"), root)
    settings = root / ".settings"
    for plugin, values in {
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings / (plugin + ".jupyterlab-settings")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"),
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={root}",
        "--NotebookNotary.db_file=:memory:",
        "--LabApp.news_url=None",
    ] + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/api/status", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(root / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
        yield url
    finally:
        _shut_down_kernels(url)  # they run in sessions of their own: killing the server's group misses them
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _shut_down_kernels(url: str) -> None:
    """Ask the server to stop every kernel, so that none keeps computing after the test (and slows
    the tests after it)."""
    try:
        for k in json.load(urllib.request.urlopen(url + "/api/kernels", timeout=5)):
            req = urllib.request.Request(f"{url}/api/kernels/{k['id']}", method="DELETE")
            urllib.request.urlopen(req, timeout=15)
    except OSError:
        pass


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright  # optional dependency (see lab)

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _ink(src: str) -> float:
    """The fraction of a PNG's pixels that are not white."""
    from PIL import Image  # matplotlib's dependency

    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L")
    hist = img.histogram()
    return 1 - sum(hist[245:]) / sum(hist)


def _state(cell):
    """(text of the explorer, [(hash, ink) of each picture]) of the explorer's cell."""
    texts = cell.locator(".jp-OutputArea-output[data-mime-type='text/plain']").all_inner_texts()
    text = next((t for t in texts if "Interactive controls" not in t), "")
    pics = [img.get_attribute("src") or "" for img in cell.locator(".jp-OutputArea-output img").all()]
    return text, [(hashlib.sha1(s.encode()).hexdigest(), _ink(s)) for s in pics]


def _move(page, cell, move):
    if move[0] == "slider":
        handle = cell.locator(".noUi-handle").nth(move[1])
        handle.scroll_into_view_if_needed()
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 28, y, steps=6)
        page.mouse.up()
    else:
        select = cell.locator("select").nth(move[1])
        if isinstance(move[2], int):
            options = select.locator("option").all_inner_texts()
            current = select.evaluate("s => s.selectedIndex")
            select.select_option(index=(move[2] if move[2] != current else move[2] + 1) % len(options))
        else:
            select.select_option(label=move[2])


def _wait(predicate, seconds: float, what: str):
    end = time.time() + seconds
    while time.time() < end:
        out = predicate()
        if out:
            return out
        time.sleep(0.25)
    pytest.fail(f"timed out after {seconds:g} s waiting for {what}")


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_widget_notebook_in_a_real_browser(lab, browser, name):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{lab}/lab/workspaces/test-{name}/tree/{name}.ipynb?reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)

    # ---- a fresh open: unmodified, a sentence instead of VBox(...), the committed picture.
    # Lab flags a notebook dirty for a moment while it loads; what counts is the state once its
    # kernel has started and is idle (Lab rewrites kernelspec and language_info then, if they differ).
    def settled(seen=[]):  # noqa: B006 - counts consecutive quiet polls
        idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0
        seen.append(idle and not page.locator("li.lm-mod-current.jp-mod-dirty").count())
        return len(seen) >= 12 and all(seen[-12:])

    end = time.time() + 90
    while time.time() < end and not settled():
        time.sleep(0.25)
    assert page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count(), (
        "the kernel did not start"
    )
    assert page.locator("li.lm-mod-current.jp-mod-dirty").count() == 0, (
        "the notebook is marked modified on open"
    )
    body = page.locator(".jp-Notebook").inner_text()
    assert "VBox(children" not in body and "HBox(children" not in body
    cell = page.locator(".jp-CodeCell").filter(has_text="Interactive controls")
    assert cell.count() == 1 and "run this cell" in cell.inner_text()
    assert len(_state(cell)[1]) == 1, "the committed picture is missing"

    # ---- Run All
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator("li.lm-Menu-item", has_text="Run All Cells").first.click()

    def finished():
        text = page.locator(".jp-Notebook").inner_text()
        if "Traceback" in text:  # Run All stops at an error: say which instead of waiting
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            pytest.fail(
                f"{name}: a cell raised during Run All:\n" + "\n".join(errors.all_inner_texts())[-3000:]
            )
        idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count()
        return idle and page.locator(".jp-OutputArea-output", has_text="NOT YET").count()

    _wait(
        lambda: page.locator(".jp-Notebook-ExecutionIndicator[data-status='busy']").count(),
        60,
        "Run All to start",
    )
    _wait(finished, 600, "Run All to finish")
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-box"))
    assert cell.count() == 1
    _wait(lambda: len(_state(cell)[1]) == 1 and _state(cell)[0], 30, "the explorer's first picture")
    shots = os.environ.get("MINIPAR_SCREENSHOTS")

    # ---- move every control
    for i, move in enumerate(NOTEBOOKS[name]):
        text0, pics0 = _state(cell)
        if shots and i == 0:
            os.makedirs(shots, exist_ok=True)
            cell.screenshot(path=os.path.join(shots, f"{name}-before.png"))
        _move(page, cell, move)
        text, pics = _wait(lambda: (s := _state(cell))[0] != text0 and s, 120, f"{move} to change the text")
        time.sleep(0.3)  # the picture was sent before the text
        text, pics = _state(cell)
        assert len(pics) == 1, f"{name}, {move}: {len(pics)} pictures in the explorer's cell"
        assert pics[0][1] > 0.02, f"{name}, {move}: the picture is blank"
        if "cannot draw" not in text:
            assert pics[0][0] != pics0[0][0], f"{name}, {move}: the text changed but the picture did not"
        if shots and i == 0:
            cell.screenshot(path=os.path.join(shots, f"{name}-after.png"))
    assert page.locator(".jp-Notebook img").count() >= 1
    assert not [e for e in errors if "widget" in e.lower() or "render" in e.lower()], errors
    page.close()
    _shut_down_kernels(lab)  # closing the page leaves its kernel running, busy beside the next test
