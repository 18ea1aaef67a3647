"""The OHIF v3 viewer in headless Chromium, reading from Orthanc: how radiologists see our objects.

Radiologists open the node's SEG, TID 1500 SR and Secondary Capture objects in OHIF, so the tests
and the probe check them there rather than only with dciodvfy and dcmqi. The pieces:

- :func:`ohif_dist`: OHIF's prebuilt ``dist/`` (npm ``@ohif/app``, put in ``.ohif/`` by
  ``scripts/setup.sh``), or None;
- :class:`OhifServer`: serves that dist on a free loopback port, with our own ``/app-config.js``
  and a reverse proxy from ``/dicom-web`` to Orthanc's DICOMweb, so the viewer and its data are
  one origin and need no CORS;
- :class:`Viewer`: OHIF's controls on :class:`dicomnode.testing.browser.Chromium` (Playwright
  driving Debian's Chromium, WebGL from SwiftShader, every console message and page error kept);
- ``python -m dicomnode.testing.ohif probe DIR [--out OUT]``: every DICOM file under DIR into a
  fresh Orthanc, each series of each study into OHIF's viewport, with screenshots, the side
  panels' text and the console log written to OUT.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.testing.browser import Chromium, require_chromium
from dicomnode.testing.peers import LOOPBACK, free_port
from dicomnode.testing.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    import numpy as np

    from dicomnode.testing.orthanc import Orthanc

log = logging.getLogger(__name__)

DIST_ENV = "DICOMNODE_OHIF_DIST"
REPO = Path(__file__).resolve().parents[2]
DICOMWEB_PATH = "/dicom-web"
THUMBNAIL = '[data-cy="study-browser-thumbnail"], [data-cy="study-browser-thumbnail-no-image"]'
#: the canvas cornerstone3D draws the active viewport into
VIEWPORT_CANVAS = ".viewport-wrapper.active canvas.cornerstone-canvas, canvas.cornerstone-canvas"
VIEWPORT_PANE = '[data-cy="viewport-pane"]'
#: the corner overlay's image number: "I:27 (14/40)", instance 27, shown 14th of 40
SLICE = re.compile(r"I:\s*(\d+)\s*\((\d+)/(\d+)\)")


def ohif_dist() -> Path | None:
    """OHIF's built viewer: $DICOMNODE_OHIF_DIST, else the one scripts/setup.sh installs; None
    when there is no ``index.html`` there."""
    configured = os.environ.get(DIST_ENV)
    dist = Path(configured) if configured else REPO / ".ohif/node_modules/@ohif/app/dist"
    return dist if (dist / "index.html").is_file() else None


def require_ohif() -> Path:
    """OHIF's dist, or the test ends (:func:`missing_peer`: a skip, a failure where
    $DICOMNODE_REQUIRE_PEERS=1) when it, Chromium, Playwright or Orthanc's DICOMweb is missing."""
    from dicomnode.testing.orthanc import DICOMWEB_PLUGIN, ORTHANC
    from dicomnode.testing.peers import missing_peer

    dist = ohif_dist()
    if dist is None:
        missing_peer(
            "OHIF's dist is missing (.ohif/, from scripts/setup.sh; or $DICOMNODE_OHIF_DIST)"
        )
    require_chromium()
    if not Path(ORTHANC).exists() or not DICOMWEB_PLUGIN.exists():
        missing_peer("Orthanc or its DICOMweb plugin is not installed (Debian orthanc-dicomweb)")
    return dist


def app_config(friendly_name: str = "dicomnode test Orthanc") -> str:
    """OHIF's ``window.config``: one DICOMweb data source at this origin's ``/dicom-web``."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": friendly_name,
            "name": "orthanc",
            "qidoRoot": "__ROOT__",
            "wadoRoot": "__ROOT__",
            "wadoUriRoot": "__ROOT__",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    text = json.dumps(config, indent=2).replace('"__ROOT__"', "root")
    return (
        "// written by dicomnode.testing.ohif: Orthanc's DICOMweb through this server\n"
        f"const root = window.location.origin + {json.dumps(DICOMWEB_PATH)};\n"
        "// no first-visit guided tour over the viewport (it takes the clicks)\n"
        "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));\n"
        f"window.config = {text};\n"
    )


# -- the static server and DICOMweb proxy --------------------------------------------------------


class _Handler(SimpleHTTPRequestHandler):
    """The dist with a single-page-app fallback, our config, and ``/dicom-web`` proxied."""

    protocol_version = "HTTP/1.1"
    server: _OhifHttpServer
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "application/javascript",
        ".mjs": "application/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(kwargs.pop("directory")), **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ohif http: " + format, *args)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_POST(self) -> None:
        if self._is_dicomweb():
            self._proxy()
        else:
            self.send_error(405, f"POST {self.path}: only {DICOMWEB_PATH} takes POST")

    def _is_dicomweb(self) -> bool:
        path = urllib.parse.urlsplit(self.path).path
        return path == DICOMWEB_PATH or path.startswith(DICOMWEB_PATH + "/")

    def _route(self, *, head: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if self._is_dicomweb():
            self._proxy()
            return
        if path == "/app-config.js":
            body = self.server.config_js.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        local = Path(self.translate_path(self.path))
        if not local.exists() and "." not in path.rsplit("/", 1)[-1]:
            self.path = "/index.html"  # a route of the app (/viewer, /segmentation, ...)
        if head:
            super().do_HEAD()
        else:
            super().do_GET()

    def _proxy(self) -> None:
        """Forward to Orthanc and stream its answer back; Orthanc gets the browser's Host, so
        the BulkDataURIs it writes point back through this proxy."""
        upstream = urllib.parse.urlsplit(self.server.dicomweb_url)
        target = upstream.path.rstrip("/") + self.path[len(DICOMWEB_PATH) :]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            name: value
            for name in ("Accept", "Content-Type", "Host")
            if (value := self.headers.get(name)) is not None
        }
        connection = http.client.HTTPConnection(upstream.netloc, timeout=120)
        try:
            try:
                connection.request(self.command, target, body=body, headers=headers)
                response = connection.getresponse()
            except OSError as error:
                self.send_error(502, f"Orthanc at {self.server.dicomweb_url}: {error}")
                return
            self.send_response(response.status, response.reason)
            for name in ("Content-Type", "Content-Length", "Content-Location", "ETag"):
                if (value := response.getheader(name)) is not None:
                    self.send_header(name, value)
            if response.getheader("Content-Length") is None:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command == "HEAD":
                return
            while chunk := response.read(1 << 16):
                self.wfile.write(chunk)
        finally:
            connection.close()


class _OhifHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    config_js: str
    dicomweb_url: str


class OhifServer:
    """OHIF's dist on ``127.0.0.1:port`` with Orthanc's DICOMweb under the same origin; use as a
    context manager (the server runs in a thread of this process)."""

    def __init__(self, dist: Path, dicomweb_url: str, *, port: int | None = None) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF build at {dist} (no index.html); run setup.sh")
        self.dist = dist
        self.dicomweb_url = dicomweb_url
        self.port = port or free_port()
        self._server: _OhifHttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def viewer_url(self, study_uid: str) -> str:
        query = urllib.parse.urlencode({"StudyInstanceUIDs": study_uid})
        return f"{self.url}/viewer?{query}"

    def start(self) -> OhifServer:
        def handler(*args: Any) -> _Handler:
            return _Handler(*args, directory=self.dist)

        server = _OhifHttpServer((LOOPBACK, self.port), handler)
        server.config_js = app_config()
        server.dicomweb_url = self.dicomweb_url
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ohif-http", daemon=True)
        self._thread.start()
        log.info("OHIF at %s, DICOMweb from %s", self.url, self.dicomweb_url)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# -- the browser ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thumbnail:
    """One series in OHIF's study browser."""

    display_set_uid: str
    description: str
    modality: str
    series_number: str


class ViewerError(RuntimeError):
    """OHIF did not show what was asked for in time."""


class Viewer(Chromium):
    """One Chromium page with OHIF in it, driven by Playwright; use as a context manager."""

    def __init__(self, *, width: int = 1600, height: int = 1000, timeout_s: float = 30.0) -> None:
        super().__init__(width=width, height=height, timeout_s=timeout_s)

    # -- what tests and the probe do ------------------------------------------------------------

    def open_study(self, url: str) -> list[Thumbnail]:
        """Open OHIF's viewer at ``url`` and wait for the study browser's thumbnails."""
        self.console.add("dicomnode", f"open {url}")
        self.page.goto(url, wait_until="domcontentloaded")
        self.page.wait_for_selector(THUMBNAIL, state="visible")
        self.skip_tour()
        return self.thumbnails()

    def thumbnails(self) -> list[Thumbnail]:
        """The series the study browser lists, in its order."""
        found = self.page.eval_on_selector_all(
            THUMBNAIL,
            """els => els.map(e => {
                const text = sel => (e.querySelector(sel)?.textContent || '').trim();
                return [e.id.replace(/^thumbnail-/, ''),
                        text('[data-cy="series-description-label"]'),
                        text('[data-cy="series-modality-label"]'), e.dataset.series || ''];
            })""",
        )
        return [Thumbnail(*row) for row in found]

    def load_series(self, thumbnail: Thumbnail) -> None:
        """Double-click the series' thumbnail: OHIF puts it into the active viewport."""
        self.console.add("dicomnode", f"load {thumbnail.modality} {thumbnail.description!r}")
        self.page.locator(f"#thumbnail-{css_escape(thumbnail.display_set_uid)}").dblclick()

    def viewport_pixels(self) -> np.ndarray:
        """The active viewport as RGB, from a screenshot (WebGL canvases do not keep their
        pixels for readback)."""
        import numpy as np
        from PIL import Image

        canvas = self.page.locator(VIEWPORT_CANVAS).first
        png = canvas.screenshot(animations="disabled", timeout=self.timeout_s * 1000)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def lit_fraction(self) -> float:
        """The share of the viewport's pixels that are not black."""
        pixels = self.viewport_pixels()
        return float((pixels.max(axis=2) > 24).mean())

    def coloured_fraction(self) -> float:
        """The share of the viewport's pixels that are clearly coloured (grey images are not):
        a segmentation overlay. The margins, where OHIF's blue icons and border are, are left
        out."""
        pixels = self.viewport_pixels().astype(int)
        height, width = pixels.shape[:2]
        pixels = pixels[height // 10 : -height // 10, width // 10 : -width // 10]
        return float((pixels.max(axis=2) - pixels.min(axis=2) > 60).mean())

    def wait_rendered(self, *, min_lit: float = 0.02, timeout: float | None = None) -> float:
        """Wait until the viewport shows an image (not all black); the lit share."""
        return wait_until(
            lambda: (lit := self.lit_fraction()) >= min_lit and lit,
            timeout=timeout or self.timeout_s,
            interval=0.5,
            what="OHIF's viewport to show an image",
            ignore=(Exception,),  # the canvas is replaced while OHIF sets the viewport up
        )

    def wait_coloured(self, *, min_share: float = 1e-4, timeout: float | None = None) -> float:
        """Wait until coloured (overlay) pixels show in the viewport; their share."""
        return wait_until(
            lambda: (share := self.coloured_fraction()) >= min_share and share,
            timeout=timeout or self.timeout_s,
            interval=0.5,
            what="coloured overlay pixels in OHIF's viewport",
            ignore=(Exception,),
        )

    def scroll(self, slices: int) -> None:
        """Move ``slices`` images on (back when negative) with the mouse wheel over the viewport."""
        box = self.page.locator(VIEWPORT_CANVAS).first.bounding_box()
        if box is None:
            raise ViewerError("no viewport to scroll")
        self.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(abs(slices)):
            self.page.mouse.wheel(0, 100 if slices > 0 else -100)

    def overlay_text(self) -> str:
        """The viewport's corner overlays (series, slice number, window)."""
        return "\n".join(
            text.strip()
            for text in self.page.locator('[data-cy^="viewport-overlay-"]').all_inner_texts()
        )

    def shown_instance(self) -> int:
        """The InstanceNumber of the image the viewport shows (from its corner overlay)."""
        found = SLICE.search(self.overlay_text())
        if not found:
            raise ViewerError(f"no image number in the viewport's overlay: {self.overlay_text()!r}")
        return int(found.group(1))

    def open_report(self, url: str, *, track: bool, modality: str = "SR") -> list[str]:
        """Open the study at ``url``, then its (first) series of ``modality``; answer OHIF's
        "track these measurements?" (asked because it can rebuild them as its own tools) with
        yes or no. The questions asked."""
        self.open_study(url)

        # the study browser lists series as their metadata comes: wait for the report's
        def listed() -> Thumbnail | None:
            return next((t for t in self.thumbnails() if t.modality == modality), None)

        report = wait_until(listed, timeout=self.timeout_s,
                            what=f"OHIF's study browser to list the {modality}")  # fmt: skip
        # the first series in the viewport, set up (its image may be all but black: the first
        # slice of a sagittal head series is outside the head)
        wait_until(lambda: SLICE.search(self.overlay_text()), timeout=self.timeout_s,
                   what="OHIF's first image", ignore=(Exception,))  # fmt: skip
        assert report is not None  # wait_until returns only a truthy value
        self.load_series(report)
        asked = self.answer_prompts("Yes" if track else "No", wait=15)
        self.wait_rendered()
        return asked

    def annotation_text(self) -> list[str]:
        """The text lines of the annotations drawn on the viewport (cornerstone draws them as
        SVG over the canvas): an SR's labels and numbers as a radiologist reads them."""
        lines: list[str] = self.page.eval_on_selector_all(
            "svg text", "nodes => nodes.map(n => n.textContent.trim()).filter(Boolean)"
        )
        return lines

    def wait_annotations(self, *, timeout: float | None = None) -> list[str]:
        """The annotations' text, once there is some."""
        wait_until(self.annotation_text, timeout=timeout or self.timeout_s,
                   what="annotations drawn on the viewport")  # fmt: skip
        return self.annotation_text()

    def panel_text(self) -> dict[str, str]:
        """The text of the side panels (the open tab of each), by side; empty when collapsed."""
        texts: dict[str, str] = self.page.evaluate(
            """() => Object.fromEntries(['left', 'right'].map(side => {
                const header = document.querySelector(`[data-cy="side-panel-header-${side}"]`);
                return [side, header?.parentElement?.parentElement?.innerText || ''];
            }))"""
        )
        return texts

    def right_panel_tabs(self) -> list[str]:
        """The names of the right panel's tabs (their ``{name}-btn`` buttons)."""
        names = self.page.eval_on_selector_all(
            '[data-cy="side-panel-header-right"] ~ * [data-cy$="-btn"], '
            '[data-cy="side-panel-header-right"] [data-cy$="-btn"]',
            "els => els.map(e => e.dataset.cy.replace(/-btn$/, ''))",
        )
        return list(dict.fromkeys(names))

    def show_tab(self, name: str) -> str:
        """Open the side panel tab ``name``; the right panel's text once it shows more than its
        title."""
        self.page.locator(f'[data-cy="{name}-btn"]').first.click()

        def shown() -> str:
            text = self.panel_text().get("right", "")
            return text if "\n" in text else ""  # more than the panel's title

        return wait_until(
            shown,
            timeout=5,
            interval=0.2,
            what=f"OHIF's {name} panel",
        )

    def prompts(self) -> list[str]:
        """The questions OHIF shows in the viewport now (open this Segmentation? track?)."""
        found = self.page.eval_on_selector_all(
            "button",
            """els => els.filter(e => e.offsetParent && e.textContent.trim() === 'Yes')
                        .map(e => e.parentElement?.parentElement?.innerText || '')""",
        )
        return [" ".join(text.split()) for text in found]

    def answer_prompts(self, answer: str = "Yes", *, wait: float = 0.0) -> list[str]:
        """Answer each question OHIF shows with ``answer`` (waiting up to ``wait`` s for one to
        show); the questions, none when none showed."""
        try:
            asked = wait_until(self.prompts, timeout=wait, interval=0.2, what="OHIF's question")
        except WaitTimeout:
            return []
        buttons = self.page.locator("button:visible", has_text=re.compile(f"^{answer}$"))
        for _ in range(buttons.count()):
            buttons.first.click()
        return asked

    def skip_tour(self) -> None:
        """Close OHIF's first-visit guided tour when it shows (it covers the viewport)."""
        skip = self.page.locator("text=Skip all")
        if skip.count() and skip.first.is_visible():
            skip.first.click()


def css_escape(identifier: str) -> str:
    """A display-set UID as a CSS id selector (ids may hold characters CSS treats specially)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else f"\\{ord(ch):x} " for ch in identifier)


# -- the probe -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesShown:
    """What OHIF showed for one series."""

    study_uid: str
    description: str
    modality: str
    screenshot: str
    lit: float | None
    coloured: float | None
    overlay: str
    panels: dict[str, str]
    prompts: list[str]
    error: str | None


def dicom_files(folder: Path) -> list[Path]:
    """Files under ``folder`` with the DICM preamble marker."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as file:
                if file.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


@contextmanager
def ohif_stack(root: Path, dist: Path) -> Iterator[tuple[Orthanc, OhifServer, Viewer]]:
    """Orthanc with DICOMweb, OHIF's server in front of it and a viewer; all stopped after."""
    from dicomnode.testing.orthanc import orthanc

    with ExitStack() as stack:
        pacs = stack.enter_context(orthanc(root / "orthanc", dicomweb=True, graceful_stop=False))
        server = stack.enter_context(OhifServer(dist, pacs.dicomweb_url))
        viewer = stack.enter_context(Viewer())
        yield pacs, server, viewer


def show_series(viewer: Viewer, thumbnail: Thumbnail, study: str, out: Path, n: int) -> SeriesShown:
    """Load one series, answer OHIF's questions with yes, record what it shows."""
    error = None
    lit = coloured = None
    prompts: list[str] = []
    try:
        viewer.load_series(thumbnail)
        viewer.skip_tour()
        # a SEG or SR first shows a preview and asks whether to open it (track it)
        wait = 10.0 if thumbnail.modality in ("SEG", "SR", "RTSTRUCT") else 0.0
        prompts = viewer.answer_prompts(wait=wait)
        lit = viewer.wait_rendered(timeout=20)
        coloured = viewer.coloured_fraction()
    except Exception as exc:  # the probe goes on to the next series
        error = f"{type(exc).__name__}: {exc}"
    name = f"{n:02d}-{thumbnail.modality or 'NA'}-{safe_name(thumbnail.description)}"
    shot = viewer.screenshot(out / "screenshots" / safe_name(study) / f"{name}.png")
    panels = {}
    for tab in viewer.right_panel_tabs():
        try:
            panels[tab] = viewer.show_tab(tab)
            viewer.screenshot(out / "screenshots" / safe_name(study) / f"{name}-{tab}.png")
        except Exception as exc:  # a tab that cannot be shown is noted, not fatal
            panels[tab] = f"(could not show: {exc})"
    return SeriesShown(
        study, thumbnail.description, thumbnail.modality, str(shot), lit, coloured,
        viewer.overlay_text(), panels, prompts, error,
    )  # fmt: skip


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:60] or "series"


def probe(folder: Path, out: Path, *, dist: Path | None = None) -> dict[str, Any]:
    """Every DICOM file under ``folder`` into a fresh Orthanc, each series of each study into
    OHIF; screenshots, panel texts and the console log under ``out``; the summary."""
    dist = dist or ohif_dist()
    if dist is None:
        raise FileNotFoundError(f"no OHIF dist: set ${DIST_ENV} or run scripts/setup.sh")
    started = time.monotonic()
    files = dicom_files(folder)
    if not files:
        raise FileNotFoundError(f"no DICOM files under {folder}")
    out.mkdir(parents=True, exist_ok=True)
    shown: list[SeriesShown] = []
    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="ohif-probe-"))
        pacs, server, viewer = stack.enter_context(ohif_stack(Path(scratch), dist))
        stack.callback(viewer.console.write, out / "console.json")  # also when it fails
        studies = sorted({pacs.upload(path)["ParentStudy"] for path in files})
        for study_id in studies:
            study = str(pacs.rest(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"])
            thumbnails = viewer.open_study(server.viewer_url(study))
            for n, thumbnail in enumerate(thumbnails):
                shown.append(show_series(viewer, thumbnail, study, out, n))
    summary = {
        "files": len(files),
        "seconds": round(time.monotonic() - started, 1),
        "series": [asdict(s) for s in shown],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicomnode.testing.ohif")
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe", help="show every series under DIR in OHIF")
    probe_parser.add_argument("folder", type=Path, metavar="DIR")
    probe_parser.add_argument("--out", type=Path, default=Path("ohif-probe"))
    probe_parser.add_argument("--dist", type=Path, default=None, help="OHIF's dist folder")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if arguments.out.exists():
        shutil.rmtree(arguments.out / "screenshots", ignore_errors=True)
    summary = probe(arguments.folder, arguments.out, dist=arguments.dist)
    for series in summary["series"]:
        state = series["error"] or f"lit {series['lit']}, coloured {series['coloured']}"
        print(f"{series['modality']:4} {series['description'][:40]:40} {state}")
    print(f"{summary['files']} files, {summary['seconds']} s; see {arguments.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
