"""Debian's Chromium, headless, driven by Playwright: the one browser the tests drive.

Playwright launches the system Chromium (``executable_path``; never a browser it downloads) with
WebGL from SwiftShader, which OHIF's cornerstone3D needs, and every page keeps what it said
(console messages, page errors, failed requests, HTTP errors) in a :class:`ConsoleLog`.
:class:`Chromium` is one browser with one page; :func:`kept` writes a test's console log and, when
the test failed, a screenshot; :func:`chromium_page` is both, giving the page. The dashboard tests
use the page as it is; :class:`dicomnode.testing.ohif.Viewer` adds OHIF's controls to it.

The dashboard's Content-Security-Policy forbids ``eval``: give ``page.wait_for_function`` a
function (``"() => ..."``), which Playwright calls, not an expression, which it evaluates.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright, Response

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
#: Chromium without a GPU: WebGL (cornerstone3D needs WebGL2) from ANGLE on SwiftShader, which
#: Chromium only falls back to when told that this is wanted.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
)


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def require_chromium() -> str:
    """Chromium's path, or the test ends (:func:`missing_peer`: a skip, a failure where
    $DICOMNODE_REQUIRE_PEERS=1) when it or the playwright package is missing."""
    from dicomnode.testing.peers import missing_peer

    executable = chromium_path()
    if executable is None:
        missing_peer("Chromium is not installed (Debian package chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing_peer("the playwright package is not installed (pip install -e '.[dev]')")
    return executable


@dataclass
class ConsoleLog:
    """What the page said: console messages, page errors, failed requests, HTTP errors."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, text: str, **more: Any) -> None:
        with self._lock:
            self.entries.append({"time": round(time.time(), 3), "type": kind, "text": text, **more})

    def clear(self) -> None:
        """Forget what was said so far (one test's log apart from the last's)."""
        with self._lock:
            self.entries.clear()

    def matching(self, *words: str) -> list[dict[str, Any]]:
        """Entries whose type or text mentions any of ``words`` (case-insensitive)."""
        lowered = [word.lower() for word in words]
        with self._lock:
            return [
                entry
                for entry in self.entries
                if any(w in f"{entry['type']} {entry['text']}".lower() for w in lowered)
            ]

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            path.write_text(json.dumps(self.entries, indent=1))
        return path


class BrowserError(RuntimeError):
    """The browser is not there to drive (not installed, or not started)."""


class Chromium:
    """One headless Chromium with one page, driven by Playwright; use as a context manager.

    ``timeout_s`` bounds every Playwright wait on the page (actions, ``wait_for_function``) and
    ``expect``'s assertions."""

    def __init__(self, *, width: int = 1280, height: int = 900, timeout_s: float = 30.0) -> None:
        self.width = width
        self.height = height
        self.timeout_s = timeout_s
        self.console = ConsoleLog()
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._page: Page | None = None

    @property
    def page(self) -> Page:
        if self._page is None:
            raise BrowserError(f"{type(self).__name__} is not started")
        return self._page

    def start(self) -> Self:
        from playwright.sync_api import expect, sync_playwright

        executable = chromium_path()
        if executable is None:
            raise BrowserError("Chromium is not installed (Debian package chromium)")
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=executable, args=list(CHROMIUM_ARGS), headless=True
            )
            page = self._browser.new_page(viewport={"width": self.width, "height": self.height})
        except BaseException:
            self.close()
            raise
        page.set_default_timeout(self.timeout_s * 1000)
        expect.set_options(timeout=self.timeout_s * 1000)
        page.on("console", lambda m: self.console.add(m.type, m.text, location=m.location))
        page.on("pageerror", lambda e: self.console.add("pageerror", f"{e.name}: {e.message}"))
        page.on(
            "requestfailed",
            lambda r: self.console.add("requestfailed", f"{r.method} {r.url}: {r.failure}"),
        )
        page.on("response", self._response)
        self._page = page
        return self

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.console.add("http", f"{response.status} {response.url}")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        browser, self._browser, self._page = self._browser, None, None
        if browser is not None:
            browser.close()
        playwright, self._playwright = self._playwright, None
        if playwright is not None:
            playwright.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextmanager
def kept(browser: Chromium, folder: Path, failed: Callable[[], bool]) -> Iterator[Path]:
    """A test's screenshots and the console log under ``folder``; when ``failed()`` says so
    after it (pytest does not raise a test's failure into its fixtures), also a screenshot of
    the page, and the folder printed."""
    try:
        yield folder
    finally:
        browser.console.write(folder / "console.json")
        if failed():
            browser.screenshot(folder / "failure.png")
            print(f"browser screenshots and console log: {folder}")


@contextmanager
def chromium_page(
    folder: Path, failed: Callable[[], bool], *, width: int = 1280, height: int = 900,
    timeout_s: float = 30.0,
) -> Iterator[Page]:  # fmt: skip
    """A page in a fresh headless Chromium, its console log (and a screenshot on failure) kept
    under ``folder`` as :func:`kept` does; the browser closed after."""
    with (
        Chromium(width=width, height=height, timeout_s=timeout_s) as browser,
        kept(browser, folder, failed),
    ):
        yield browser.page
