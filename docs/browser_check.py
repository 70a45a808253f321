"""Drive headless Chromium over the DevTools protocol (a pipe, no extra package) to check and photograph pages.

``docs/check_in_browser.sh`` serves the built site and runs this script. For each page it waits until the page has
done what a reader would see (the search index answered, MathJax typeset the formulas, every image decoded), checks
that, and takes a screenshot. It exits non-zero naming what did not render.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shot:
    """One page to look at: where, what must hold before the screenshot (JavaScript booleans), how tall."""

    name: str
    path: str
    checks: dict[str, str]
    height: int = 2000


# What a reader must see. Each check is a JavaScript expression that must become true within the timeout.
NAVIGATION = "document.querySelectorAll('.md-nav__link').length > 20"
IMAGES = "[...document.images].length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)"
# Typeset, without errors, and drawn: the glyphs' fonts loaded (their styles missing leaves invisible formulas).
MATH = (
    "document.querySelectorAll('mjx-container').length > 0 && !document.querySelector('mjx-merror')"
    " && [...document.fonts].some(f => f.family.startsWith('MJXTEX') && f.status === 'loaded')"
)
HIGHLIGHT = "document.querySelectorAll('.highlight code span.kn, .highlight code span.n').length > 10"
SEARCH = "document.querySelectorAll('.md-search-result__item').length > 0"

SHOTS = (
    Shot(
        "guide_curvature",
        "guides/curvature/",
        {"navigation": NAVIGATION, "highlighted code": HIGHLIGHT, "images": IMAGES, "math": MATH},
        2400,
    ),
    Shot(
        "api_curvature",
        "api/curvature/",
        {"navigation": NAVIGATION, "highlighted code": HIGHLIGHT},
        2400,
    ),
    Shot("search", "getting-started/?q=sharpness", {"navigation": NAVIGATION, "search results": SEARCH}, 1200),
)


class Browser:
    """Headless Chromium with its DevTools protocol on file descriptors 3 (commands in) and 4 (answers out)."""

    def __init__(self, executable: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The protocol's descriptors are fixed (3 and 4): a shell puts the pipes' ends there and runs the browser.
        # (Through 8 and 9 first, so that neither end is overwritten when the pipes were given 3 or 4 here.)
        wire = f'exec 8<&{to_browser_r} 9>&{from_browser_w}; exec "$0" "$@" 3<&8 4>&9 8<&- 9>&-'
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
        ]
        self._process = subprocess.Popen(  # noqa: S603 - a fixed command line
            ["/bin/sh", "-c", wire, executable, *flags, "about:blank"],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open_page(self, width: int, height: int) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]
        self.send("Page.enable")
        self.resize(width, height)

    def resize(self, width: int, height: int) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def evaluate(self, expression: str) -> object:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (RuntimeError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()


def check(browser: Browser, base: str, shot: Shot, out: Path, timeout: float) -> list[str]:
    """Load one page, wait for its checks, screenshot it; the names of the checks that failed."""
    browser.resize(1400, shot.height)
    browser.send("Page.navigate", {"url": f"{base}/{shot.path}"})
    deadline = time.monotonic() + timeout
    pending = dict(shot.checks)
    while pending and time.monotonic() < deadline:
        time.sleep(0.25)
        for name, expression in list(pending.items()):
            if browser.evaluate(f"document.readyState === 'complete' && Boolean({expression})") is True:
                del pending[name]
    time.sleep(0.5)  # let the last layout settle (MathJax, images) before the picture
    png = browser.send("Page.captureScreenshot", {"format": "png"})["data"]
    (out / f"{shot.name}.png").write_bytes(base64.b64decode(png))
    return list(pending)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the served site, e.g. http://127.0.0.1:8765")
    parser.add_argument("--out", type=Path, required=True, help="folder for the screenshots")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one page's checks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory() as profile:  # a new, empty profile every time
        browser = Browser(args.chromium, profile)
        try:
            browser.open_page(1400, 2000)
            for shot in SHOTS:
                failed = check(browser, args.base.rstrip("/"), shot, args.out, args.timeout)
                status = "ok" if not failed else "NOT RENDERED: " + ", ".join(failed)
                print(f"check_in_browser: {args.out / (shot.name + '.png')}  </{shot.path}>  {status}")
                failures += [f"{shot.path}: {name}" for name in failed]
        finally:
            browser.close()
    if failures:
        print("check_in_browser: failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
