"""The browser side of the clinician page's tests: a real headless Chromium (skipped, with the reason, where it is
missing), the page as a user drives it, and the browser's own network log.

The browser and the page driver are ``edgemed.benchmarks.ui_screenshots``' (the screenshot command drives the page
the same way); this kit adds what only tests need.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from serve_kit import ServerThread, audit_lines

# the repo's own module: imported, never skipped (at import it needs only the standard library;
# selenium and Chromium are checked by need_browser)
from edgemed.benchmarks import ui_screenshots as ui
Page = ui.Page

#: The model id the page's servers answer to.
MODEL = "smollm2-test"


def need_browser() -> None:
    why = ui.missing_browser()
    if why:
        pytest.skip(f"the clinician page's browser tests need a headless Chromium: {why}")


class Browser:
    """One Chromium for a test module, and every request it made (read off its DevTools performance log)."""

    def __init__(self, driver):
        self.driver = driver
        self.seen: list[tuple[str, str]] = []

    def requests(self) -> list[tuple[str, str]]:
        """``(url, document url)`` of each request the browser has sent since the last call
        (``Network.requestWillBeSent``; the document is the page the request was made for)."""
        found = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                params = message["params"]
                found.append((params["request"]["url"], params.get("documentURL", "")))
        self.seen += found
        return found

    def forget(self, url: str) -> None:
        """Drop the requests made to the server at ``url`` from ``seen`` (a test's own second server)."""
        self.requests()
        self.seen = [r for r in self.seen if not r[0].startswith(url + "/")]

    def page(self, url: str) -> Page:
        self.requests()  # drop what earlier tests left in the log
        return Page(self.driver, url).open().ready()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def outside(requests: list[tuple[str, str]], origin: str) -> list[str]:
    """The requests that left ``origin`` (scheme, host and port): any the page's documents made elsewhere (whatever
    the scheme: data:, blob:, another host), and any that went to the network (http, https, ws) anywhere else.
    Chromium's own chrome:// pages (its new-tab page at start) load from inside the browser and are not the page's."""
    home = _origin(origin)
    return [url for url, document in requests
            if (_origin(document) == home or urlsplit(url).scheme in ("http", "https", "ws", "wss"))
            and _origin(url) != home]


@contextlib.contextmanager
def page_server(model_path: Path, audit_path: Path, *, slots: int = 1, n_ctx: int = 1024, **config):
    """``create_app`` on SmolLM2 in a uvicorn thread (``serve_kit.ServerThread``), ``n_ctx`` tokens a slot:
    ``srv.url``, ``srv.batcher``."""
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.runtime.engine import LoadSettings
    from edgemed.serve.app import create_app
    from edgemed.serve.audit import AuditLog
    from edgemed.serve.config import ServeConfig

    batcher = Batcher(model_path, LoadSettings(n_ctx=n_ctx * slots, n_threads=2), slots=slots, queue_size=2)
    batcher.start()
    log = AuditLog(audit_path)
    try:
        app = create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="file:sha256:test", audit=log, **config))
        with ServerThread(app) as srv:
            srv.batcher, srv.audit_path = batcher, audit_path
            yield srv
    finally:
        batcher.close()
        log.close()


def audit_records(path: Path) -> list[dict]:
    """The audit's ``request`` records, one per request once it is over (a generation's ``accepted`` record, written
    before it is queued, is left out)."""
    return [r for r in audit_lines(path) if r["kind"] == "request"]


def stored(driver) -> dict:
    """What the page left in the browser's storage: localStorage and sessionStorage keys, IndexedDB names."""
    databases = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "indexedDB.databases().then(d => done(d.map(x => x.name))).catch(e => done(['error: ' + e]));")
    return {"local": driver.execute_script("return Object.keys(localStorage)"),
            "session": driver.execute_script("return Object.keys(sessionStorage)"),
            "indexeddb": databases}


def spellchecked(driver) -> list[str]:
    """Text controls on the page that the browser would spell-check (what is typed goes to its checker)."""
    return driver.execute_script("""
        return [...document.querySelectorAll('textarea, input[type=text], input:not([type])')]
          .filter(e => e.spellcheck)
          .map(e => e.id || e.outerHTML);""")


def unlabelled(driver) -> list[str]:
    """Form controls on the page with no label (a <label for>, a wrapping label, or aria-label)."""
    return driver.execute_script("""
        return [...document.querySelectorAll('input, select, textarea')]
          .filter(e => e.type !== 'hidden' && e.offsetParent !== null)
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
          .map(e => e.outerHTML);""")
