#!/usr/bin/env python
"""Check tools/web_demo.py in a real headless browser, and take the screenshot in docs/DEMOS.md.

    python tools/check_web_demo.py --output docs/web_demo.png [--config-file ... --weights ...]

Starts the web demo on 127.0.0.1 (the default model: the quickstart's tiny model, with its trained
head when ./tools/quickstart.sh has run), opens it in headless Chromium (Selenium and chromedriver),
picks a synthetic example, places a box prompt per shape and a point by clicking, types a
vocabulary, checks that the page shows a label and a score for every region and that the page
asked nothing from outside 127.0.0.1, saves a screenshot, and stops the browser and the server.
Exit code 0 when every check passed, 1 otherwise. Needs Debian's `chromium` and `chromium-driver`
(or CHROMIUM / CHROMEDRIVER naming the binaries).

The browser plumbing here (`start_server`, `start_browser`, `click_pixel`, ...) is what the test
tests/tools/test_web_demo_browser.py drives the page with.
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB_DEMO = os.path.join(ROOT, "tools", "web_demo.py")
# How long to wait for the server to start and for the page to show a result. They guard against a
# hang only, so they are far above what a slow or busy machine needs.
START_TIMEOUT_S = 1800.0
WAIT_TIMEOUT_S = 600.0
INSTALL_HINT = ("Install Chromium and its driver: `apt-get install -y chromium chromium-driver` (Debian; "
                "./tools/setup_browser.sh does it when run as root), or set CHROMIUM and CHROMEDRIVER to "
                "the browser and chromedriver binaries.")
# Flags for a headless Chromium on a closed network: without the background-networking ones it
# tries (and fails) to reach Google's services.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def load_web_demo():
    """tools/web_demo.py as a module (tools/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("regionspot_tool_web_demo", WEB_DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def browser_paths() -> Tuple[str, str]:
    """(chromium, chromedriver) binaries; RuntimeError with the install hint when missing."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p]
        raise RuntimeError(f"No {' and no '.join(missing)} found. {INSTALL_HINT}")
    return chromium, driver


# ---------------------------------------------------------------------------------- server
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(args: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
                 timeout: float = START_TIMEOUT_S, log_path: Optional[str] = None) -> Iterator[str]:
    """Run `python tools/web_demo.py ARGS --port P` on 127.0.0.1; yield its URL once it answers;
    stop it (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    own_log = not log_path
    if own_log:
        fd, log_path = tempfile.mkstemp(prefix="regionspot_web_demo_", suffix=".log")
        os.close(fd)
    cmd = [sys.executable, WEB_DEMO, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"The web demo exited with code {proc.returncode}:\n"
                                   f"{open(log_path).read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "config", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"The web demo did not answer on {url} within {timeout:.0f} s.")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if own_log:
            os.remove(log_path)


# ---------------------------------------------------------------------------------- browser
@contextlib.contextmanager
def start_browser(width: int = 1400, height: int = 1000):
    """A headless Chromium (Selenium's Chrome driver) with a fresh profile and network logging;
    quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    profile = tempfile.mkdtemp(prefix="regionspot_chromium_")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout: float = WAIT_TIMEOUT_S, what: str = "the page", interval: float = 0.2):
    """Poll `condition()` until it returns something truthy (returned); TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as e:  # the element may be re-rendered between lookups
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"Waited {timeout:.0f} s for {what}; last seen: {last!r}")


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def css_all(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: css_all(driver, "#image_file input[type=file]"), what="the page to render")


def idle(driver, timeout: float = WAIT_TIMEOUT_S, settle: int = 3) -> None:
    """Wait until Gradio shows no pending event (no progress text, ETA bar or pending marker) for
    `settle` polls in a row (a chained event starts right after the one before it ends)."""
    busy = "return document.querySelectorAll('.eta-bar, .progress-text, .pending').length;"
    quiet = [0]

    def settled():
        quiet[0] = quiet[0] + 1 if driver.execute_script(busy) == 0 else 0
        return quiet[0] >= settle

    time.sleep(0.2)
    wait_for(settled, timeout, "the page's events to finish")


def upload(driver, path: str) -> None:
    """Give the page's image input a file, as a user's file dialog does."""
    css(driver, "#image_file input[type=file]").send_keys(os.path.abspath(path))
    wait_for(lambda: css_all(driver, "#canvas img"), what="the uploaded image on the canvas")
    idle(driver)


def canvas_geometry(driver) -> List[float]:
    """[left, top, width, height, natural width, natural height] of the canvas image."""
    return driver.execute_script(
        "const i = arguments[0], r = i.getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, i.naturalWidth, i.naturalHeight];", css(driver, "#canvas img"))


def click_pixel(driver, x: float, y: float) -> None:
    """Click the canvas image over image pixel (x, y), at whatever size the page shows it.

    Gradio maps a click to pixels with the scale min(shown / natural size, 1) and the letterbox
    offsets of the image in its box; this inverts that mapping."""
    from selenium.webdriver.common.action_chains import ActionChains

    _, _, w, h, nw, nh = canvas_geometry(driver)
    scale = min(w / nw, h / nh, 1.0)
    left, top = (w - nw * scale) / 2, (h - nh * scale) / 2
    dx, dy = left + (x + 0.5) * scale - w / 2, top + (y + 0.5) * scale - h / 2  # offsets from the centre
    ActionChains(driver).move_to_element_with_offset(css(driver, "#canvas img"), round(dx), round(dy)).click().perform()
    idle(driver)


def choose_mode(driver, label_start: str) -> None:
    """Pick the click mode whose label starts with `label_start` (e.g. 'box')."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//*[@id='mode']//label[starts-with(normalize-space(.), '{label_start}')]").click()


def set_text(driver, selector: str, text: str, submit: bool = False) -> None:
    """Replace the text of the textbox at `selector` (optionally pressing Enter to submit it)."""
    from selenium.webdriver.common.keys import Keys

    box = css(driver, f"{selector} textarea, {selector} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    if submit:
        box.send_keys(Keys.ENTER)
        idle(driver)


def text_of(driver, selector: str) -> str:
    el = css(driver, f"{selector} textarea, {selector} input")
    return el.get_attribute("value")


def table_rows(driver) -> List[List[str]]:
    """The regions table's body rows as cell texts. Gradio renders only the rows in view: call
    `fit_window` first to see them all."""
    rows = driver.execute_script(  # Gradio 6's virtual table: div rows of gridcells
        "return Array.from(document.querySelectorAll('#table div[role=row]')).map("
        "row => Array.from(row.querySelectorAll('[role=gridcell]')).map(cell => cell.textContent.trim()));")
    return [r for r in rows if any(r)]


def region_rows(driver, count: int, timeout: float = WAIT_TIMEOUT_S) -> List[List[str]]:
    """The table's rank-1 rows (region, prompt, rank, class, score) once it shows `count` regions
    and reads the same twice in a row (it re-renders as the page changes)."""
    fit_window(driver)
    last: List = [None]

    def read():
        rows = [r for r in table_rows(driver) if len(r) == 5 and r[2] == "1"]
        same, last[0] = rows == last[0], rows
        return rows if same and len(rows) == count else None

    return wait_for(read, timeout, f"a table of {count} regions", interval=0.5)


def canvas_png(driver) -> bytes:
    """The bytes of the picture the canvas shows (fetched from the server as the browser did)."""
    src = css(driver, "#canvas img").get_attribute("src")
    with urllib.request.urlopen(src, timeout=30) as r:
        return r.read()


def error_messages(driver) -> List[str]:
    """Texts of the error toasts the page shows."""
    return [e.text for e in css_all(driver, ".toast-body") if e.text.strip()]


def fit_window(driver, width: int = 0) -> None:
    """Make the window tall enough that a screenshot shows the whole page."""
    inner, outer = driver.execute_script("return [[window.innerWidth, window.innerHeight], "
                                         "[window.outerWidth, window.outerHeight]];")
    page = driver.execute_script("return document.documentElement.scrollHeight;")
    driver.set_window_size(width or outer[0], page + outer[1] - inner[1])
    driver.execute_script("window.scrollTo(0, 0);")
    time.sleep(0.5)


def outside_requests(driver) -> List[str]:
    """http(s) URLs the page requested from anywhere but 127.0.0.1 (from the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            local = url.startswith(("http://127.0.0.1", "https://127.0.0.1"))
            if url.startswith(("http://", "https://")) and not local:
                urls.append(url)
    return urls


@contextlib.contextmanager
def screenshot_on_failure(driver, output: str):
    """On an exception, save what the browser shows next to `output` (…_failed.png) and say where."""
    try:
        yield
    except BaseException as e:
        path = os.path.splitext(output)[0] + "_failed.png"
        with contextlib.suppress(Exception):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            driver.save_screenshot(path)
            e.add_note(f"The page at the failure: {path}")
        raise


# ---------------------------------------------------------------------------------- the check
def shape_boxes(json_path: str, image_index: int) -> List[Tuple[str, List[float]]]:
    """(class, XYXY box) of the shapes of a synthetic image, from its LVIS-format json."""
    data = json.load(open(json_path))
    names = {c["id"]: c["name"] for c in data["categories"]}
    image_id = data["images"][image_index]["id"]
    out = []
    for a in data["annotations"]:
        if a["image_id"] == image_id:
            x, y, w, h = a["bbox"]
            out.append((names[a["category_id"]], [x, y, x + w, y + h]))
    return out


def run_check(output: str, server_args: Sequence[str] = (), image_index: int = 0) -> List[str]:
    """Drive the page as described in the module docstring; return the failed checks (empty = all passed)."""
    web_demo = load_web_demo()
    from regionspot.data.synthetic import DEFAULT_CLASSES

    failures = []
    examples, json_path = web_demo.synthetic_examples()  # the page's own examples
    image = examples[image_index]
    shapes = shape_boxes(json_path, image_index)
    vocabulary = ", ".join(DEFAULT_CLASSES)
    with start_server(server_args) as url, start_browser(1400, 1040) as driver, \
            screenshot_on_failure(driver, output):
        open_page(driver, url)
        upload(driver, image)
        set_text(driver, "#vocabulary", vocabulary)
        choose_mode(driver, "box")
        for _, (x0, y0, x1, y1) in shapes:
            click_pixel(driver, x0 - 3, y0 - 3)
            click_pixel(driver, x1 + 3, y1 + 3)
        choose_mode(driver, "foreground")
        x0, y0, x1, y1 = shapes[-1][1]
        click_pixel(driver, (x0 + x1) / 2, (y0 + y1) / 2)  # a point inside the last box refines its region
        rows = region_rows(driver, len(shapes))
        lines = [ln for ln in text_of(driver, "#prompts").splitlines() if ln.strip()]
        if len(lines) != len(shapes):
            failures.append(f"{len(shapes)} box prompts placed, but the prompt box holds {len(lines)} lines: {lines}")
        for row in rows:
            if row[3] not in DEFAULT_CLASSES or not 0 < float(row[4]) <= 1:
                failures.append(f"Region row {row} has no vocabulary class or no score.")
        status = css(driver, "#status").text
        if "image encoders" not in status or "regions" not in status:
            failures.append(f"The page shows no timings: {status!r}")
        if error_messages(driver):
            failures.append(f"The page shows errors: {error_messages(driver)}")
        outside = outside_requests(driver)
        if outside:
            failures.append(f"The page requested URLs outside 127.0.0.1: {sorted(set(outside))[:5]}")
        fit_window(driver)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        driver.save_screenshot(output)
        right = sum(row[3] == name for row, (name, _) in zip(rows, shapes))
        print(f"{len(rows)} regions; top-1 label right for {right} (truth: {', '.join(n for n, _ in shapes)}).")
        print(status)
    return failures


def compact_png(path: str, colours: int = 128) -> None:
    """Rewrite a screenshot with a palette of `colours` (a third of the size; fine for a page)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/web_demo.png", help="where to save the screenshot (PNG)")
    p.add_argument("--image-index", type=int, default=2, help="which synthetic example to use (0-3)")
    p.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="options for tools/web_demo.py (after --), e.g. -- --weights my_head.pth")
    args = p.parse_args(argv)
    extra = [a for a in args.server_args if a != "--"]
    try:
        failures = run_check(args.output, extra, args.image_index)
        compact_png(args.output)
    except (RuntimeError, TimeoutError) as e:
        print(f"check_web_demo.py: {e}" + "".join(f"\n{n}" for n in getattr(e, "__notes__", [])), file=sys.stderr)
        return 1
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(f"Screenshot: {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
