"""The web chat page end to end: headless Chromium (Debian's) types messages into the page served by a
real server, and the streamed replies must equal what the engine writes for the same conversation."""

import os
from pathlib import Path

import pytest

from test_server import FOX, KEY, expected, reference, run_dir, server  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def reply_of(page, n: int) -> tuple[str, int, str]:
    """The n-th assistant reply once it has finished: its text, how many chunks built it, why it ended."""
    bubble = page.locator(".message.assistant").nth(n)
    bubble.and_(page.locator("[data-done='true']")).wait_for(timeout=60_000)
    return bubble.text_content(), int(bubble.get_attribute("data-chunks") or 0), bubble.get_attribute("data-finish")


def test_typing_a_message_streams_the_engines_reply_and_keeps_the_conversation(browser, server, reference):
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server.url + "/")
    # the server wants an API key: the page says so, and works once it is given
    page.locator("#error").wait_for()
    assert "API key" in page.text_content("#error")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    page.select_option("#model", "tiny")
    page.fill("#system", FOX[0]["content"])
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")

    page.fill("#input", FOX[1]["content"])
    page.click("#send")
    text, chunks, finish = reply_of(page, 0)
    [want] = expected(reference["tiny"], messages=FOX, max_tokens=24)
    assert text == want and len(want) > 5
    assert chunks > 1 and finish == "length"  # it arrived in pieces, as the server streamed it

    # a second turn, sent with Enter: the request carries the whole conversation
    page.fill("#input", "And the dog?")
    page.press("#input", "Enter")
    second, chunks, _ = reply_of(page, 1)
    history = FOX + [{"role": "assistant", "content": want}, {"role": "user", "content": "And the dog?"}]
    assert second == expected(reference["tiny"], messages=history, max_tokens=24)[0] and chunks > 1
    assert page.locator(".message.user").count() == 2 and page.is_hidden("#error")

    # an adapter is just another model in the list
    page.click("#new-chat")
    page.select_option("#model", "math")
    page.fill("#input", FOX[1]["content"])
    page.click("#send")
    text, _, _ = reply_of(page, 0)
    assert text == expected(reference["math"], messages=FOX, max_tokens=24)[0] != want
    assert problems == []
    page.close()
