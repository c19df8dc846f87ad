"""The status page in a real browser: Debian's headless Chromium, driven by
Selenium through Debian's chromedriver (nothing is downloaded). Skipped when
either is missing; ``.ci/run`` installs them.

The page must show every backend, then show a backend's state change after
it is drained through the admin API, and after it is killed (active checks
take it DOWN). A screenshot is saved in ``test-artifacts/`` (or
``$FASTLB_ARTIFACTS``)."""
import os
import re
import shutil
import time

import httpx
import pytest

from helpers import (  # noqa: F401  (fixtures are used by name)
    REPO, FastlbProcess, active_core, backend_loop, make_backend, ok_response)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.usefixtures("active_core"),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not "
                       "installed (apt-get install chromium chromium-driver)"),
]

TOKEN = "browser-test-token-0123456789abcdef"


def _log(lb):
    return lb.startup.decode() + b"".join(lb.stderr_lines).decode("utf-8", "replace")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def _state(driver, address):
    # read in one script: the page redraws its tables every second
    return driver.execute_script(
        "var e = document.querySelector('tr[data-backend=\"' + arguments[0] + '\"] span.st');"
        "return e ? e.textContent : null;", address)


def _requests(driver, address):
    """The "requests" cell of a backend's row (the fifth)."""
    text = driver.execute_script(
        "var r = document.querySelector('tr[data-backend=\"' + arguments[0] + '\"]');"
        "return r ? r.cells[4].textContent : null;", address)
    return int(text) if text else -1


def _wait(cond, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    return cond()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_status_page_shows_backends_and_their_changes(tmp_path, make_backend, browser, workers):
    a = make_backend("A", handler=lambda be, req: ok_response(b"A"))
    b = make_backend("B", handler=lambda be, req: ok_response(b"B"))
    c = make_backend("C", handler=lambda be, req: ok_response(b"C"))
    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    lb = FastlbProcess([a.addr, b.addr, c.addr], "--workers", str(workers), "--admin",
                       "127.0.0.1:0", "--admin-token-file", str(tf), "--health-path", "/",
                       "--health-interval", "0.3", "--health-fall", "1")
    try:
        m = _wait(lambda: re.search(r"admin listening on 127\.0\.0\.1:(\d+)", _log(lb)))
        assert m, _log(lb)
        admin = f"http://127.0.0.1:{m.group(1)}"
        with httpx.Client(timeout=5) as h:
            for _ in range(30):
                assert h.get(lb.url + "/").status_code == 200
        browser.get(admin + "/status")
        addrs = [f"127.0.0.1:{x.port}" for x in (a, b, c)]
        assert _wait(lambda: all(_state(browser, x) == "UP" for x in addrs)), \
            browser.page_source[:2000]
        assert "pool default" in browser.page_source
        # drained through the API: the page shows it within a few refreshes
        r = httpx.post(f"{admin}/api/pools/default/backends/{addrs[1]}/drain",
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert _wait(lambda: _state(browser, addrs[1]) == "DRAIN"), _state(browser, addrs[1])
        # killed: the checks take it DOWN, and the page says so
        c.stop()
        assert _wait(lambda: _state(browser, addrs[2]) == "DOWN"), _state(browser, addrs[2])
        assert _state(browser, addrs[0]) == "UP"
        # the request counts on the page move with traffic
        before = _requests(browser, addrs[0])
        with httpx.Client(timeout=5) as h:
            for _ in range(10):
                assert h.get(lb.url + "/").content == b"A"
        assert _wait(lambda: _requests(browser, addrs[0]) >= before + 10), \
            (before, _requests(browser, addrs[0]))
        assert before >= 10     # its share of the first 30
        out = os.environ.get("FASTLB_ARTIFACTS") or os.path.join(REPO, "test-artifacts")
        os.makedirs(out, exist_ok=True)
        shot = os.path.join(out, f"status-{workers}.png")
        assert browser.save_screenshot(shot)
        assert os.path.getsize(shot) > 10000
    finally:
        assert lb.terminate(timeout=30) == 0
