"""The pages in a real browser: Playwright driving Debian's Chromium (headless) against a real `serve`. Chat with
the default model (streamed text, token counts), Stop (the request ends `cancelled`), model output that tries to
run script, load and unload from the models page, the status page showing requests; axe-core on each page.
Screenshots go to var/screenshots/."""

import json
import os
import shutil
import subprocess
import time

import pytest
from django.contrib.auth.models import User
from playwright.sync_api import Page, expect, sync_playwright

from inference.models import RequestLog
from tests.conftest import MODEL, ROOT
from tests.test_end_to_end import WEATHER_TOOL

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
AXE = ROOT / "tests/node/node_modules/axe-core/axe.min.js"
SHOTS = ROOT / "var/screenshots"
PASSWORD = "a-password-for-the-browser-test"
expect.set_options(timeout=60_000)  # a ceiling, not a measure: the first answer loads the model on two busy cores


def _chromium() -> str:
    """Debian's Chromium, installed now when missing and this run may (root); else the module is skipped."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("Debian's chromium is missing (apt-get install -y chromium) and this run cannot install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "chromium"]
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
            subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    # Playwright's sync API keeps an event loop running in this thread, so Django would refuse the tests' ORM
    # calls as "async"; they are plain blocking calls between browser steps.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=_chromium(), headless=True)
            yield browser
            browser.close()
    finally:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture
def page(browser, minerva_server, smollm2):
    # bypass_csp: axe-core is injected as an inline script, which the pages' Content-Security-Policy refuses
    context = browser.new_context(base_url=minerva_server.base_url.removesuffix("/v1"), bypass_csp=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == []


def _staff_login(page: Page, path: str) -> None:
    User.objects.create_user("admin", password=PASSWORD, is_staff=True)
    page.goto(path)
    expect(page).to_have_url(f"/admin/login/?next={path}")
    page.fill("#id_username", "admin")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page).to_have_url(path)


def _accessible(page: Page, name: str) -> None:
    """No axe-core violation of serious or critical impact; a full-page screenshot to var/screenshots/."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)
    page.add_script_tag(path=AXE)
    results = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    serious = [(v["id"], v["help"], [n["target"] for n in v["nodes"]]) for v in results["violations"]
               if v["impact"] in ("serious", "critical")]  # fmt: skip
    assert serious == [], name


def _wait_for_row(predicate, seconds: float = 30) -> RequestLog:
    deadline = time.monotonic() + seconds
    while True:
        row = RequestLog.objects.filter(endpoint="/v1/chat/completions").order_by("-created").first()
        if row is not None and predicate(row):
            return row
        assert time.monotonic() < deadline, row and (row.status, row.completion_tokens)
        time.sleep(0.3)


def test_a_message_to_the_default_model_streams_its_answer_with_token_counts(page):
    page.goto("/")
    expect(page.locator("#model")).to_have_value(MODEL)  # the default model, not the embedding one
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Say hello.")
    page.keyboard.press("Enter")
    answer = page.locator(".message.assistant").last
    expect(answer.locator(".content")).not_to_be_empty()
    stats = answer.locator(".stats")
    expect(stats).to_contain_text("prompt ")
    expect(stats).to_contain_text("completion 12")
    expect(stats).to_contain_text("tok/s")
    expect(page.locator("#send")).to_be_enabled()
    row = _wait_for_row(lambda r: r.status == "completed")
    assert row.completion_tokens == 12 and row.stream
    _accessible(page, "chat")
    # Conversations are kept in the browser, several at once: a new one starts empty, the first is one click away
    # (after a reload too).
    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    page.reload()
    expect(page.locator("#conversations li")).to_have_count(2)
    page.click("#conversations >> text=Say hello.")
    expect(page.locator(".message.user")).to_have_text("YouSay hello.")
    expect(page.locator(".message.assistant .stats")).to_contain_text("completion 12")


def test_stop_aborts_the_answer_and_the_server_logs_it_cancelled(page):
    page.goto("/")
    page.fill("#max-tokens", "2000")
    page.fill("#prompt", "Write a very long story about a dragon.")
    page.click("#send")
    stats = page.locator(".message.assistant .stats").last
    expect(stats).to_contain_text("tokens so far")
    page.click("#stop")
    expect(stats).to_contain_text("stopped")
    row = _wait_for_row(lambda r: r.status != "running" and r.status != "queued")
    assert row.status == "cancelled" and 0 < row.completion_tokens < 2000


def test_an_api_error_shows_the_apis_message(page):
    page.goto("/")
    page.fill("#max-tokens", "0")
    page.fill("#prompt", "Say hello.")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("max_tokens")
    expect(page.locator(".message.assistant .stats")).to_contain_text("finish: error")


def test_a_message_sent_before_the_model_list_came_waits_for_it(page):
    held = []  # the page's GET /v1/models, answered only once the message is sent
    page.route("**/v1/models", lambda route: held.append(route))
    page.goto("/")
    page.fill("#max-tokens", "0")  # the API's refusal shows that the message went out, to the listed model
    page.fill("#prompt", "Say hello.")
    page.click("#send")
    while not held:
        page.wait_for_timeout(50)
    held[0].continue_()
    expect(page.locator("#error")).to_contain_text("max_tokens")
    expect(page.locator(".message.assistant")).to_have_count(1)


def test_streamed_tool_calls_are_shown_as_json(page):
    page.goto("/")
    page.fill("#tools", json.dumps([WEATHER_TOOL]))
    page.select_option("#tool-choice", "required")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "60")
    page.fill("#prompt", "What is the weather in Paris?")
    page.click("#send")
    expect(page.locator(".message.assistant .stats")).to_contain_text("finish: tool_calls")
    [call] = json.loads(page.locator(".message.assistant .tool-calls pre").text_content())
    assert call["id"].startswith("call_") and call["name"] == "get_weather" and "city" in call["arguments"]


def test_reasoning_is_folded(page):
    answer = {"role": "assistant", "model": MODEL, "content": "Sunny.", "reasoning": "The user wants the weather."}
    _seed(page, [{"role": "user", "content": "Weather in Paris?"}, answer])
    reasoning = page.locator(".message.assistant details")
    expect(reasoning).not_to_have_attribute("open", "")
    expect(reasoning.locator("summary")).to_have_text("Reasoning")
    expect(reasoning.locator(".reasoning")).to_be_hidden()
    reasoning.locator("summary").click()
    expect(reasoning.locator(".reasoning")).to_have_text("The user wants the weather.")


def _seed(page: Page, messages: list[dict]) -> None:
    """Open the page with one stored conversation holding `messages`."""
    page.goto("/")
    page.evaluate("c => { localStorage.setItem('minerva.conversations', JSON.stringify([c]));"
                  " localStorage.setItem('minerva.current', 'c1'); }",
                  {"id": "c1", "title": "seeded", "messages": messages})  # fmt: skip
    page.reload()


def test_model_output_never_runs_script(page):
    hostile = ('Look: <img src="x" onerror="window.pwned = 1"> <script>window.pwned = 2</script> '
               '[link](javascript:window.pwned=3) <svg><animate onbegin="window.pwned = 4"/></svg>\n\n'
               "```python\nprint('<b>not bold</b>')\n```")  # fmt: skip
    _seed(page, [{"role": "user", "content": "hi"}, {"role": "assistant", "model": MODEL, "content": hostile}])
    content = page.locator(".message.assistant .content")
    expect(content).to_contain_text("Look:")
    page.locator(".message.assistant .content a").click()  # a javascript: link would run now
    assert page.evaluate("window.pwned") is None
    assert content.locator("script").count() == 0
    handlers = "e => [...e.querySelectorAll('*')].flatMap(n => [...n.attributes].map(a => a.name))"
    assert [name for name in content.evaluate(handlers) if name.startswith("on")] == []
    assert content.locator("a").get_attribute("href") is None
    expect(content.locator("pre code.hljs")).to_contain_text("print('<b>not bold</b>')")


def test_staff_load_and_unload_a_model_from_the_page_and_see_requests_on_the_status_page(page):
    _staff_login(page, "/models")
    model = page.locator(f'[data-model="{MODEL}"]')
    model.locator("button[data-action=unload]").click()
    expect(model.locator("[data-state]")).to_contain_text("idle")
    model.locator("button[data-action=load]").click()
    expect(model.locator("[data-state]")).to_contain_text("loaded")
    _accessible(page, "models")
    page.click("nav >> text=Status")
    expect(page.locator("#requests tbody")).to_contain_text(f"/minerva/api/models/{MODEL}/load")
    expect(page.locator("#models tbody")).to_contain_text("loaded")
    _accessible(page, "status")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    page.screenshot(path=SHOTS / "status-phone.png")
    page.goto("/minerva/api/docs")  # ReDoc from this server, over every surface
    expect(page.get_by_text("Chat, streamed as NDJSON").first).to_be_attached()
    _accessible(page, "docs-phone")
    page.goto("/")
    _accessible(page, "chat-phone")
