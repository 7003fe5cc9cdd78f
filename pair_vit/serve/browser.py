"""Headless Chromium driven over the DevTools protocol on a pipe: open the review page, choose an image in it, wait
for the result, take a screenshot. No WebDriver and no extra package: `--remote-debugging-pipe` reads JSON
commands on the browser's fd 3 and writes answers and events on fd 4, each message ending in a NUL byte.

    with Chromium() as browser:                         # /usr/bin/chromium (Debian's package)
        page = browser.open("http://127.0.0.1:8000/", width=412, height=915, mobile=True)
        page.choose_file("#file", "query.jpg")
        page.wait_for("document.querySelectorAll('#candidates li').length > 0", timeout=120)
        page.screenshot("review.png")
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Debian's /usr/bin/chromium is a shell launcher whose sourced settings may reuse fds 3 and 4; run the browser
# itself, which it would exec.
DEBIAN_BINARY = "/usr/lib/chromium/chromium"


class BrowserError(RuntimeError):
    """Chromium answered a command with an error, or did not answer in time."""


class Chromium:
    """A headless Chromium process, closed (and its profile deleted) on exit of the `with` block."""

    def __init__(self, binary: str = CHROMIUM):
        self.binary = DEBIAN_BINARY if binary == CHROMIUM and os.path.exists(DEBIAN_BINARY) else binary
        self._ids = 0
        self._buffer = b""

    def __enter__(self) -> Chromium:
        self.profile = tempfile.mkdtemp(prefix="pair_vit_chromium_")
        to_browser, self._out = os.pipe()  # we write commands, the browser reads them on fd 3
        self._in, from_browser = os.pipe()  # the browser writes on fd 4, we read

        def pipes_on_3_and_4() -> None:
            # In the child. Copies above 3 and 4 first: a pipe end may itself be fd 3 or 4 (dup2 onto itself
            # would keep it close-on-exec, onto the other would clobber it); dup2's copies survive exec.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [self.binary, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             f"--user-data-dir={self.profile}", "about:blank"],
            close_fds=False, preexec_fn=pipes_on_3_and_4,  # close_fds would close 3 and 4 after preexec_fn
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in (self._out, self._in):
            os.close(fd)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        """Send one command and return its result, skipping the events that come before it."""
        self._ids += 1
        message = {"id": self._ids, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._next(deadline)
            if answer.get("id") == self._ids:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise BrowserError("Chromium closed the pipe (did it start?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str, width: int = 412, height: int = 915, mobile: bool = True) -> Page:
        """A new tab of `width` x `height` CSS pixels (a phone's by default) showing `url`, loaded."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                          "deviceScaleFactor": 1, "mobile": mobile})
        page.send("Page.navigate", {"url": url})
        page.wait_for("document.readyState === 'complete'", timeout=30)
        return page


class Page:
    """One tab of a `Chromium`, attached as a flat session."""

    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 60, every: float = 0.25) -> None:
        """Poll the JavaScript `condition` until it is true; BrowserError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(condition):
            if time.monotonic() > deadline:
                raise BrowserError(f"still false after {timeout} s: {condition}")
            time.sleep(every)

    def choose_file(self, selector: str, path: str | os.PathLike) -> None:
        """Set the file of the `<input type=file>` at `selector`, as a user choosing it (fires change)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise BrowserError(f"no element {selector!r} in the page")
        self.send("DOM.setFileInputFiles", {"files": [str(Path(path).resolve())], "nodeId": node})

    def screenshot(self, path: str | os.PathLike) -> Path:
        """A PNG of the whole page (beyond the viewport), written to `path`."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        Path(path).write_bytes(base64.b64decode(shot["data"]))
        return Path(path)


def review_screenshot(url: str, query: str | os.PathLike, out: str | os.PathLike, width: int = 412,
                      height: int = 915, timeout: float = 300) -> dict:
    """Open the review page at `url` in headless Chromium (a phone's viewport by default), choose `query` in it,
    wait until its candidates and their thumbnails are drawn, write a screenshot to `out`. Returns what the page
    shows: the status line, the candidates' texts, the overlay note, and the page's width against the viewport's
    (a page wider than a phone's screen would scroll sideways)."""
    with Chromium() as browser:
        page = browser.open(url, width=width, height=height, mobile=True)
        page.wait_for("document.getElementById('collection').textContent.includes('references')", timeout=60)
        page.choose_file("#file", query)
        page.wait_for("!document.getElementById('result').hidden || "
                      "document.getElementById('status').className === 'error'", timeout=timeout)
        page.wait_for("[...document.querySelectorAll('#candidates li')].every((li) => 'thumbnail' in li)",
                      timeout=60)
        shown = page.evaluate("""({
            status: document.getElementById('status').textContent,
            error: document.getElementById('status').className === 'error',
            candidates: [...document.querySelectorAll('#candidates li')].map((li) => li.innerText),
            overlay: document.getElementById('overlay-note').textContent,
            pageWidth: document.documentElement.scrollWidth, viewportWidth: window.innerWidth})""")
        page.screenshot(out)
    return shown
