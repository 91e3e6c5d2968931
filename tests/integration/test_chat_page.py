"""The chat page in a real headless Chromium (Debian's `chromium` and `chromium-driver`):
it loads the served models, sends a message, and the streamed reply appears. The test
saves a screenshot to test-artifacts/chat_page.png.

Without Chromium the test is skipped, unless FEDIT_REQUIRE_BROWSER is set (as .ci/run
does), so that CI cannot pass without it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Nothing but the page on 127.0.0.1: no update checks, sync, or other background traffic.
QUIET_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--window-size=1000,700",
]


@pytest.fixture
def browser():
    if CHROMIUM is None or DRIVER is None:
        if os.environ.get("FEDIT_REQUIRE_BROWSER"):
            pytest.fail("FEDIT_REQUIRE_BROWSER is set, and chromium / chromedriver are missing")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install ...)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in QUIET_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_chat_page_streams_a_reply_from_the_chosen_adapter(server: str, browser) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 3)
    models = Select(browser.find_element(By.ID, "model"))
    assert sorted(o.text for o in models.options) == ["a", "b", "base"]
    models.select_by_visible_text("b")
    budget = browser.find_element(By.ID, "max_tokens")
    budget.clear()
    budget.send_keys("16")  # within the test server's cap
    browser.find_element(By.ID, "input").send_keys("Add 2 and 3.")
    browser.find_element(By.ID, "send").click()
    done = (By.CSS_SELECTOR, ".turn.assistant[data-state='done']")
    try:
        reply = wait.until(ready.presence_of_element_located(done))
    except TimeoutException:
        pytest.fail(
            f"no finished reply; the page shows: {browser.find_element(By.ID, 'log').text!r}"
        )
    assert browser.find_element(By.CSS_SELECTOR, ".turn.user").text == "Add 2 and 3."
    assert reply.text.strip()  # the streamed answer, in the page
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(out / "chat_page.png"))
    assert (out / "chat_page.png").stat().st_size > 1000
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn.error")
    assert Path(out / "chat_page.png").is_file()
