"""The clinician page in a real headless Chromium against a stand-in server whose answers the test writes event by
event: streams the real server does not send on cue, and signing out at a shared workstation.

The stand-in serves the page's own files and ``/ui/info`` (``edgemed.serve.page``'s router, with its headers and
Content-Security-Policy) and a scripted ``/v1/chat/completions``; it checks a Bearer key when the test asks for one.
Covers: a stream that ends cleanly without a ``finish_reason`` or ``[DONE]`` (a server that failed and closed between
two whole events; Firefox and some proxies end the body normally then) is shown as cut off, kept out of the history
sent back to the model and marked so in the saved transcript; a stream that finishes still inside the reasoning block
(the template opened it, or the model did) says there is no answer, whatever the finish reason, and the transcript
keeps the reasoning under that label; "Sign out (forget key)" clears the conversation from the screen, the history and
the transcript, and hides the ask form until a key is given again.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ui_kit
from fastapi import FastAPI, Request
from serve_kit import ServerThread
from starlette.responses import JSONResponse, StreamingResponse
from ui_kit import MODEL, Browser

from edgemed.serve import page

KEY = "clinic-key-" + "z" * 24


def event(content: str | None = None, finish: str | None = None) -> str:
    """One SSE event of a streamed chat completion, as the server writes it."""
    delta = {"content": content} if content is not None else {}
    chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return "data: " + json.dumps(chunk) + "\n\n"


DONE = "data: [DONE]\n\n"
#: A whole answer, as the server sends one.
WHOLE = [event("Paracetamol 1 g"), event(" every 6 hours."), event(finish="stop"), DONE]


class Script:
    """What the stand-in answers next (``events``, extra ``headers``), the bodies it was sent, the key it wants."""

    def __init__(self):
        self.config = SimpleNamespace(model_id=MODEL, card={"intended_use": "Testing the page."}, api_keys=None)
        self.reset()

    def reset(self) -> None:
        self.events: list[str] = list(WHOLE)
        self.headers: dict[str, str] = {}
        self.bodies: list[dict] = []
        self.require(None)

    def answer(self, events: list[str], headers: dict | None = None) -> None:
        self.events, self.headers = events, headers or {}

    def require(self, key: str | None) -> None:
        self.key = key
        self.config.api_keys = object() if key else None


def stand_in(script: Script):
    app = FastAPI()
    app.state.served = SimpleNamespace(config=script.config, batcher=SimpleNamespace(n_ctx_per_slot=1024), templates={})

    @app.middleware("http")
    async def keys(request: Request, call_next):
        guarded = request.url.path == page.INFO_PATH or request.url.path.startswith("/v1/")
        if guarded and script.key and request.headers.get("authorization") != "Bearer " + script.key:
            return JSONResponse({"error": {"message": "Invalid API key.", "type": "authentication_error"}}, 401)
        return await call_next(request)

    app.include_router(page.router)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        script.bodies.append(await request.json())
        events = list(script.events)

        async def body():
            for e in events:
                yield e  # and then the body ends, cleanly, whatever the last event was

        headers = {"x-request-id": f"{len(script.bodies):032x}", **script.headers}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    return app


@pytest.fixture(scope="module")
def served():
    script = Script()
    with ServerThread(stand_in(script)) as srv:
        srv.script = script
        yield srv


@pytest.fixture(scope="module")
def browser():
    ui_kit.need_browser()
    with ui_kit.ui.chromium() as driver:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "deny"})  # "Save" is read in the page
        yield Browser(driver)


@pytest.fixture
def script(served):
    served.script.reset()
    return served.script


#: Clicks "Save conversation" and returns the text of the file it makes (the Blob, read in the page).
SAVE = """
const done = arguments[arguments.length - 1], real = URL.createObjectURL;
URL.createObjectURL = (blob) => { URL.createObjectURL = real; blob.text().then(done); return real.call(URL, blob); };
document.getElementById('export').click();
"""


def saved(browser) -> str:
    return browser.driver.execute_async_script(SAVE)


def text_of(answer, css: str) -> str:
    return answer.find_element("css selector", css).get_attribute("textContent")


def assistant_turns(body: dict) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "assistant"]


def test_a_stream_that_ends_without_its_end_marker_is_cut_off_not_answered(served, script, browser):
    script.answer([event("Give amoxicillin 5"), event("00 mg every 8 hours, and reduce the dose")])  # no finish, no [DONE]
    page = browser.page(served.url)
    page.ask("Amoxicillin dose for an adult with CKD stage 4?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done").startswith("cut off")
    status = page.find("#status").text
    assert "cut off" in status and "ask again" in status and "Answered" not in status
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "cut off" in warning.text and "incomplete" in warning.text
    assert "reduce the dose" in text_of(answer, ".answer-text")  # what came is shown, under the warning
    assert page.find("#prompt").get_attribute("value").startswith("Amoxicillin")  # asking again is one key press

    transcript = saved(browser)
    assert "A (CUT OFF, incomplete): Give amoxicillin 500 mg every 8 hours, and reduce the dose" in transcript
    assert "\nA: Give" not in transcript

    script.answer(WHOLE)  # a whole answer to the next question: it is answered, and the cut one is not its context
    page.ask("What about paracetamol?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "done" and page.find("#status").text == "Answered."
    assert not answer.find_element("css selector", ".ending").is_displayed()
    assert script.bodies[-1]["messages"] == [{"role": "user", "content": "What about paracetamol?"}]
    script.answer(WHOLE)
    page.ask("And for a child?")
    page.wait(lambda: len(page.answers()) == 3 and page.last().get_attribute("data-done"), 10, "the third answer")
    assert assistant_turns(script.bodies[-1]) == ["Paracetamol 1 g every 6 hours."]


@pytest.mark.parametrize("headers,events", [
    # the prompt ended inside an open reasoning block (the template opened it) and the model never closed it
    ({"x-edgemed-think": "open"}, [event("Weight 70 kg, so 5 mg/kg"), event(" gives 350 mg"), event(finish="stop"), DONE]),
    # the model opened the block itself, first thing, and stopped inside it
    ({}, [event("<think>"), event("Weight 70 kg, so 5 mg/kg gives 350 mg"), event(finish="stop"), DONE]),
], ids=["template-opened", "model-opened"])
def test_a_stream_that_finishes_inside_the_reasoning_gives_no_answer(served, script, browser, headers, events):
    script.answer(events, headers)
    page = browser.page(served.url)
    page.ask("Dose for a 70 kg adult?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "no answer: the model gave no answer outside its reasoning; ask again"
    status = page.find("#status").text
    assert "no answer outside its reasoning" in status and "Answered" not in status
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "no answer outside its reasoning" in warning.text
    assert text_of(answer, ".think-text").endswith("gives 350 mg") and not text_of(answer, ".answer-text").strip()
    assert not answer.find_element("css selector", ".copy").is_enabled()  # nothing to copy as an answer

    transcript = saved(browser)
    assert "A: none. The model gave no answer outside its reasoning; ask again." in transcript
    assert "Reasoning (not an answer): Weight 70 kg, so 5 mg/kg gives 350 mg" in transcript

    script.answer(WHOLE)
    page.ask("Dose for a 70 kg adult, please?")
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    assert assistant_turns(script.bodies[-1]) == []  # no empty answer sent back as the model's


def test_reasoning_cut_at_the_length_limit_still_says_so(served, script, browser):
    script.answer([event("Weigh A against B"), event(finish="length"), DONE], {"x-edgemed-think": "open"})
    page = browser.page(served.url)
    page.ask("A or B?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done").startswith("no answer: the reasoning reached the answer length limit")
    assert "Reasoning (not an answer): Weigh A against B" in saved(browser)


def _signed_in(served, script, browser):
    """The page of a server that wants KEY, with KEY given and the ask form shown."""
    script.require(KEY)
    page = browser.page(served.url)
    page.find("#key").send_keys(KEY + "\n")
    page.wait(lambda: not page.find("#ask").get_attribute("hidden"), 10, "the page after the key")
    return page


def test_sign_out_forgets_the_key_and_clears_the_conversation(served, script, browser):
    page = _signed_in(served, script, browser)
    page.ask("Patient A, 54, chest pain since this morning: differential?")
    page.wait_answer(10)
    page.find("#prompt").send_keys("Patient A's troponin is")  # a draft, not sent
    assert "Patient A" in page.find("#log").text

    sign_out = page.find("#forget-key")
    assert sign_out.text == "Sign out (forget key)"
    sign_out.click()
    page.wait(lambda: not page.find("#key-panel").get_attribute("hidden"), 10, "the key prompt")
    driver = browser.driver
    assert driver.execute_script("return Object.keys(sessionStorage)") == []
    assert page.find("#ask").get_attribute("hidden") and page.find("#conversation").get_attribute("hidden")
    assert driver.execute_script("return document.getElementById('log').textContent") == ""
    assert "Patient A" not in driver.execute_script("return document.body.textContent")
    assert page.find("#prompt").get_attribute("value") == ""
    assert not page.find("#forget-key").is_displayed()
    assert "Signed out" in page.find("#status").text

    page.find("#key").send_keys(KEY + "\n")  # the next person's key: nothing of the last conversation comes back
    page.wait(lambda: not page.find("#ask").get_attribute("hidden"), 10, "the page after the key")
    assert not page.all("#log .turn")
    page.find("#export").click()
    assert page.find("#status").text == "Nothing to save yet."
    page.ask("Hello")
    page.wait_answer(10)
    assert script.bodies[-1]["messages"] == [{"role": "user", "content": "Hello"}]
    driver.execute_script("sessionStorage.clear()")


def test_a_key_refused_mid_conversation_signs_out_and_clears_the_conversation(served, script, browser):
    """A key revoked or rotated while a conversation is on screen: the page asked for a key again and left the
    conversation, and the transcript Save writes, to whoever sat down next, with Sign out hidden."""
    page = _signed_in(served, script, browser)
    page.ask("Patient B, 61, dyspnoea on exertion: next test?")
    page.wait_answer(10)
    assert "Patient B" in page.find("#log").text
    script.require("rotated-" + "k" * 24)  # IT rotates the keys at the shift change
    page.ask("Patient B's BNP is 900: next step?")
    page.wait(lambda: not page.find("#key-panel").get_attribute("hidden"), 10, "the key prompt")
    driver = browser.driver
    assert driver.execute_script("return Object.keys(sessionStorage)") == []
    assert page.find("#ask").get_attribute("hidden") and page.find("#conversation").get_attribute("hidden")
    assert "Patient B" not in driver.execute_script("return document.body.textContent")
    assert "The key was refused" in page.find("#key-error").text and "cleared" in page.find("#status").text
    driver.execute_script("sessionStorage.clear()")
