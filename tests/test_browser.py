"""Both reports in headless Chromium: no console error, no network request, not blank.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (commands on
fd 3, events on fd 4, NUL-separated JSON) with the standard library only, so the test adds
no Python dependency. CI installs Debian's ``chromium`` (``scripts/install_chromium.sh``);
elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.browser

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-pipe")
ALLOWED_SCHEMES = ("file:", "data:", "about:")
TIMEOUT_S = 60


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None and Path("/usr/bin/chromium").is_file():
        binary = "/usr/bin/chromium"
    if binary is None:
        pytest.skip("headless Chromium is not installed (Debian package 'chromium'; "
                    "scripts/install_chromium.sh installs it)")
    return binary


class DevTools:
    """A minimal Chrome DevTools protocol client over the debugging pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        cmd_read, self._cmd_write = os.pipe()  # we write commands, Chromium reads fd 3
        self._evt_read, evt_write = os.pipe()  # Chromium writes fd 4, we read

        def to_fds_3_and_4() -> None:  # in the child, before exec
            read_copy, write_copy = os.dup(cmd_read), os.dup(evt_write)
            os.dup2(read_copy, 3)
            os.dup2(write_copy, 4)

        # Chromium's own log goes to a file: an unread stderr pipe could fill and block it
        with open(profile / "chromium.log", "wb") as log:
            self.proc = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(3, 4),
                preexec_fn=to_fds_3_and_4)
        os.close(cmd_read)
        os.close(evt_write)
        self._next_id = 0
        self._messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._evt_read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for message in messages:
                    self._messages.put(json.loads(message))

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._get()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _get(self) -> dict[str, Any]:
        try:
            message = self._messages.get(timeout=TIMEOUT_S)
        except queue.Empty:
            raise TimeoutError("no answer from Chromium") from None
        if "method" in message:
            self.events.append(message)
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError):  # no reply awaited: the browser may just exit
            os.write(self._cmd_write, json.dumps({"id": 0, "method": "Browser.close"}).encode()
                     + b"\0")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_write)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    devtools = DevTools(chromium_binary(), tmp_path_factory.mktemp("chromium-profile"))
    yield devtools
    devtools.close()


def load(browser: DevTools, path: Path, *, height: int = 2000) -> dict[str, Any]:
    """Open ``path`` in a fresh tab; return its errors, requests and a screenshot."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget",
                           {"targetId": target, "flatten": True})["sessionId"]
    first_event = len(browser.events)
    for domain in ("Runtime", "Log", "Network", "Page"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False},
                 session)
    browser.send("Page.navigate", {"url": path.as_uri()}, session)
    deadline = time.monotonic() + TIMEOUT_S
    while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                  for e in browser.events[first_event:]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not finish loading")
        browser._get()
    shot = browser.send("Page.captureScreenshot", {"format": "png"}, session)
    result = {"session": session, "target": target,
              "screenshot": base64.b64decode(shot["data"])}
    result.update(check_events(browser.events[first_event:], session))
    return result


def check_events(events: list[dict[str, Any]], session: str) -> dict[str, list[str]]:
    errors, requests = [], []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description")))
                                   for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(ALLOWED_SCHEMES):
                requests.append(url)
    return {"errors": errors, "requests": requests}


def evaluate(browser: DevTools, session: str, expression: str) -> Any:
    reply = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                              "awaitPromise": True}, session)
    if "exceptionDetails" in reply:
        raise AssertionError(reply["exceptionDetails"])
    return reply["result"].get("value")


def assert_not_blank(png: bytes, out: Path) -> None:
    from PIL import Image

    out.write_bytes(png)  # kept beside the test's tmp files for a look when it fails
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[1] == 1280
    colours = np.unique(pixels.reshape(-1, 3), axis=0).shape[0]
    assert colours > 200, f"{colours} colours: the page looks blank ({out})"
    assert pixels.std() > 15, f"no contrast: the page looks blank ({out})"


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    from tests.test_reports import render_study

    chromium_binary()  # skip before the rendering work when there is no browser
    return render_study(tmp_path_factory.mktemp("browser-reports"))


def test_harness_catches_errors_and_requests(browser, tmp_path):
    """A page with a console error, a script error and a remote image must be flagged."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><h1>bad</h1>"
                    "<img src='http://example.invalid/x.png'>"
                    "<script>console.error('boom'); undefinedFunction();</script>"
                    "</body></html>")
    result = load(browser, page, height=400)
    assert any("boom" in e for e in result["errors"])
    assert any("undefinedFunction" in e or "Uncaught" in e for e in result["errors"])
    assert any(r.startswith("http://example.invalid") for r in result["requests"])


def test_participant_report_in_chromium(browser, reports, tmp_path):
    path = reports["settings"].output_dir / "sub-11.html"
    result = load(browser, path)
    assert result["errors"] == []
    assert result["requests"] == []
    assert_not_blank(result["screenshot"], tmp_path / "participant.png")
    images = evaluate(browser, result["session"],
                      "Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) == 7 and all(done and width > 300 for done, width in images)


def test_group_report_in_chromium(browser, reports, tmp_path):
    result = load(browser, reports["group"])
    assert result["errors"] == []
    assert result["requests"] == []
    assert_not_blank(result["screenshot"], tmp_path / "group.png")
    session = result["session"]
    images = evaluate(browser, session,
                      "Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) == 3 and all(done and width > 200 for done, width in images)
    # the injected script tag is text in the page, and it never ran
    assert evaluate(browser, session, "document.body.innerText.includes("
                                      "'<script>alert(1)</script>')")
    assert evaluate(browser, session, "document.scripts.length") == 1
    # sorting by predicted age (descending on the second click) reorders the rows
    column = ("Array.from(document.querySelectorAll('#group-table th'))"
              ".findIndex(th => th.textContent.trim() === 'predicted_age')")
    values = ("Array.from(document.querySelectorAll('#group-table tbody tr'))"
              f".map(r => r.cells[{column}].textContent.trim())")
    header = f"document.querySelectorAll('#group-table th')[{column}]"
    evaluate(browser, session, f"{header}.click(); {header}.click()")
    shown = evaluate(browser, session, values)
    numbers = [float(v) for v in shown if v != "n/a"]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) == len(shown)
    assert evaluate(browser, session, f"{header}.getAttribute('aria-sort')") == "descending"
    assert check_events(browser.events, session)["errors"] == []
