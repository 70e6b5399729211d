"""The clinician page in a real headless Chromium against a stand-in server whose answers the test writes event by
event: streams the real server does not send on cue, and signing out at a shared workstation.

The stand-in serves the page's own files and ``/ui/info`` (``edgemed.serve.page``'s router, with its headers and
Content-Security-Policy) and a scripted ``/v1/chat/completions``; it checks a Bearer key when the test asks for one.
Covers: a stream that ends cleanly without a ``finish_reason`` or ``[DONE]`` (a server that failed and closed between
two whole events; Firefox and some proxies end the body normally then) is shown as cut off, sent back to the model
with its mark and marked so in the saved transcript; a stream that finishes still inside the reasoning block
(the template opened it, or the model did) says there is no answer, whatever the finish reason, and the transcript
keeps the reasoning under that label; "Sign out (forget key)" clears the conversation from the screen, the history and
the transcript, and hides the ask form until a key is given again. And: a connection dropped mid-body, an error event
after part of the answer and Stop are marked incomplete (on the answer, on Copy, in the transcript); a form answer
not in the form's format is marked, never "Answered."; an answer cut by the room left in the context, and a question
the context cannot take, tell the clinician to save and start anew, or to shorten the question when it is the
conversation's first; a required field left empty and a choice of one option are refused in the page, and Enter in an
option goes to the next; a question typed while an answer streams is kept; a line after form answers says the model
does not see them; the answer being written stays in view. And: Copy is off until the answer has ended; an answer cut
at the answer length is marked on Copy and in the transcript, and a form's, never "not in the form's format". And: a
stopped answer goes back to the model marked, and a question left out of what it is sent has a line saying so; bidi
controls are shown, copied and saved escaped; the key is kept in no storage, and one with an invisible character is
named, never used; each answer names its model, and a change of model is marked; a busy server, a body too large and
a server that cannot be reached are said in the clinician's words; the answer length box refuses what is not a whole
number of 1 or more, and reads 1e2 as 100. And: an answer cut at the answer length, or ended by any finish reason
but stop, is never "Answered." and its status is set apart; a model removed mid-conversation, an error event in the
stream and a server out of reach when the page loads are said in the clinician's words, the server's own under
"Technical detail (for IT)". And: a refusal with no code the page knows (a bare 400, 403, 413, 429, 5xx: a proxy's,
a check before the model) and a 401 (no key, or one withdrawn) are said in the clinician's words, the server's own as
the technical detail.
"""

from __future__ import annotations

import asyncio
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
from edgemed.templates import load_templates
from edgemed.templates.library import safety_preamble

KEY = "clinic-key-" + "z" * 24
#: What the page's chat sends first: the safety preamble, as ``edgemed chat`` does
PREAMBLE = {"role": "system", "content": safety_preamble()}
#: The stand-in's context window (``/ui/info``'s ``context_length``).
CONTEXT = 1024


def event(content: str | None = None, finish: str | None = None, **more) -> str:
    """One SSE event of a streamed chat completion, as the server writes it (``more``: the final chunk's ``edgemed``)."""
    delta = {"content": content} if content is not None else {}
    chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
    return "data: " + json.dumps(chunk) + "\n\n"


def usage(prompt: int, completion: int) -> str:
    """The usage event (``stream_options.include_usage``) after the final chunk."""
    chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
             "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}
    return "data: " + json.dumps(chunk) + "\n\n"


def parsed(ok: bool, value=None, error: str | None = None) -> dict:
    """The ``edgemed`` field of a template answer's final chunk."""
    return {"edgemed": {"template": {"id": "mcq", "version": "test"},
                        "parsed": {"ok": ok, "value": value, "error": error}}}


DONE = "data: [DONE]\n\n"
#: In a script's events: the server dies here, in the middle of the body (its connection drops).
DROP = object()
#: A whole answer, as the server sends one.
WHOLE = [event("Paracetamol 1 g"), event(" every 6 hours."), event(finish="stop"), DONE]


def slow(pieces: list[str], pause: float) -> list:
    """``pieces`` as events, ``pause`` seconds apart (a number in a script is a pause)."""
    return [x for piece in pieces for x in (event(piece), pause)]


class Script:
    """What the stand-in answers next (``events``, extra ``headers``), the bodies it was sent, the key it wants."""

    def __init__(self):
        self.config = SimpleNamespace(model_id=MODEL, card={"intended_use": "Testing the page."}, api_keys=None)
        self.reset()

    def reset(self) -> None:
        self.events: list = list(WHOLE)
        self.headers: dict[str, str] = {}
        self.bodies: list[dict] = []
        self.refusal: tuple[int, dict] | None = None
        self.models: list[str] = [MODEL]
        self.require(None)

    def answer(self, events: list, headers: dict | None = None) -> None:
        self.events, self.headers, self.refusal = events, headers or {}, None

    def refuse(self, status: int, code: str | None, message: str) -> None:
        """The next answers are this OpenAI-shaped error, before any stream."""
        self.refusal = (status, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": code}})

    def require(self, key: str | None) -> None:
        self.key = key
        self.config.api_keys = object() if key else None


def stand_in(script: Script):
    app = FastAPI()
    app.state.served = SimpleNamespace(config=script.config, batcher=SimpleNamespace(n_ctx_per_slot=CONTEXT),
                                       templates=load_templates())

    @app.middleware("http")
    async def keys(request: Request, call_next):
        guarded = request.url.path == page.INFO_PATH or request.url.path.startswith("/v1/")
        if guarded and script.key and request.headers.get("authorization") != "Bearer " + script.key:
            return JSONResponse({"error": {"message": "Invalid API key.", "type": "authentication_error"}}, 401)
        return await call_next(request)

    app.include_router(page.router)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in script.models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        script.bodies.append(await request.json())
        events = list(script.events)
        headers = {"x-request-id": f"{len(script.bodies):032x}", **script.headers}
        if script.refusal is not None:
            return JSONResponse(script.refusal[1], script.refusal[0], headers=headers)

        if DROP in events:  # the body it promises is longer than what comes before DROP: the connection closes short
            headers["content-length"] = str(1 << 20)

        async def body():
            for e in events:
                if e is DROP:
                    return
                if isinstance(e, (int, float)):
                    await asyncio.sleep(e)
                    continue
                yield e  # and then the body ends, cleanly, whatever the last event was

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

    cut = "[CUT OFF, incomplete] Give amoxicillin 500 mg every 8 hours, and reduce the dose"
    script.answer(WHOLE)  # a whole answer to the next question: the cut one is its context, marked as on Copy
    page.ask("What about paracetamol?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "done" and page.find("#status").text == "Answered."
    assert not answer.find_element("css selector", ".ending").is_displayed()
    assert script.bodies[-1]["messages"] == [
        PREAMBLE, {"role": "user", "content": "Amoxicillin dose for an adult with CKD stage 4?"},
        {"role": "assistant", "content": cut}, {"role": "user", "content": "What about paracetamol?"}]
    script.answer(WHOLE)
    page.ask("And for a child?")
    page.wait(lambda: len(page.answers()) == 3 and page.last().get_attribute("data-done"), 10, "the third answer")
    assert assistant_turns(script.bodies[-1]) == [cut, "Paracetamol 1 g every 6 hours."]


def test_the_chat_sends_the_safety_preamble_first_and_a_form_its_templates_own(served, script, browser):
    """The page's chat sent the clinician's turns alone: the model answered under its chat template's own default
    system message (SmolLM2's "a helpful AI assistant named SmolLM"), never the safety preamble `edgemed chat` sends.
    The preamble is the server's (``/ui/info``), once per request, and a form sends its template's, not a second."""
    page = browser.page(served.url)
    page.ask("Max paracetamol dose for an adult?")
    page.wait_answer(10)
    script.answer(WHOLE)
    page.ask("And with liver disease?")
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    for body in script.bodies:
        assert body["messages"][0] == PREAMBLE and [m["role"] for m in body["messages"]].count("system") == 1, body
    page.choose("mcq")
    page.find("#fill-example").click()
    script.answer([event("Answer: C"), event(finish="stop", **parsed(True, "C")), DONE])
    page.send()
    page.wait(lambda: len(page.answers()) == 3 and page.last().get_attribute("data-done"), 10, "the form's answer")
    assert script.bodies[-1]["template"] == "mcq" and "messages" not in script.bodies[-1]
    head = saved(browser).split("\n\n")[0]
    assert "after edgemed's safety preamble" in head and safety_preamble() not in head, head


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
    assert script.bodies[-1]["messages"] == [PREAMBLE, {"role": "user", "content": "Hello"}]
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


#: Copy's clipboard write, kept in the page where the test reads it (headless Chromium grants no clipboard).
CLIPBOARD = "navigator.clipboard.writeText = (text) => { window.__copied = text; return Promise.resolve(); };"


def copied(page, answer) -> str:
    """What Copy on ``answer`` gives."""
    page.driver.execute_script(CLIPBOARD + "window.__copied = null;")
    answer.find_element("css selector", ".copy").click()
    page.wait(lambda: page.driver.execute_script("return window.__copied") is not None, 5, "the copy")
    return page.driver.execute_script("return window.__copied")


def active_id(page) -> str:
    return page.driver.switch_to.active_element.get_attribute("id")


def test_a_question_typed_while_an_answer_streams_is_kept(served, script, browser):
    from selenium.webdriver.common.keys import Keys

    script.answer(slow(["Paracetamol 1 g", " every 6 hours,", " at most 4 g", " a day."], 0.6)
                  + [event(finish="stop"), DONE])
    page = browser.page(served.url)
    page.ask("Paracetamol dose for an adult?")
    page.wait(lambda: "Paracetamol" in page.find("#log .answer-text").text, 10, "the answer's first words")
    box = page.find("#prompt")
    box.clear()
    box.send_keys("And for a child of 20 kg?")
    box.send_keys(Keys.ENTER)  # too early: nothing is sent, and the page says why
    assert not page.last().get_attribute("data-done")
    assert page.find("#status").text == "An answer is still coming: wait, or press Stop."
    assert page.wait_answer(10).get_attribute("data-done") == "done"
    assert page.find("#prompt").get_attribute("value") == "And for a child of 20 kg?"  # not wiped by the answer's end
    assert len(script.bodies) == 1

    script.answer(WHOLE)
    page.find("#prompt").send_keys(Keys.ENTER)
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    assert script.bodies[-1]["messages"][-1] == {"role": "user", "content": "And for a child of 20 kg?"}
    assert page.find("#prompt").get_attribute("value") == ""  # sent and answered: the box is free again


def test_a_form_answer_not_in_the_forms_format_is_marked_not_answered(served, script, browser):
    error = "the reply names option C but gives the text of option B"
    script.answer([event("C. Vitamin B12"), event(finish="stop", **parsed(False, error=error)), DONE])
    page = browser.page(served.url)
    page.choose("mcq")
    page.find("#fill-example").click()
    page.send()
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "not in the form's format"
    status = page.find("#status").text
    assert "Answered" not in status and "did not follow the form's format" in status
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "no answer was read" in warning.text
    assert not answer.find_elements("css selector", ".choice-letter") and error in answer.text
    assert copied(page, answer) == "[NOT IN THE FORM'S FORMAT] C. Vitamin B12"
    assert "A (NOT IN THE FORM'S FORMAT): C. Vitamin B12" in saved(browser)


def test_enter_in_an_option_goes_to_the_next_and_one_option_is_not_sent(served, script, browser):
    from selenium.webdriver.common.keys import Keys

    page = browser.page(served.url)
    page.choose("mcq")
    page.find("#tpl-question").send_keys("Which vitamin deficiency causes scurvy?")
    page.find("#tpl-options-A").send_keys("Vitamin C" + Keys.ENTER)
    assert active_id(page) == "tpl-options-B"
    assert script.bodies == [] and not page.answers()
    page.send()  # one option: refused in the page, with the fix, and the first empty option to fill
    assert page.find("#status").text.startswith("Give at least 2 options (1 given)")
    assert active_id(page) == "tpl-options-B" and script.bodies == [] and not page.answers()

    page.find("#tpl-options-D").send_keys("Vitamin D" + Keys.ENTER)  # the last option: Enter adds the next
    assert active_id(page) == "tpl-options-E"
    page.find("#tpl-options-E").send_keys(Keys.ENTER)  # an empty last option adds none
    assert active_id(page) == "tpl-options-E" and not page.all("#tpl-options-F")
    page.find("#tpl-options-B").send_keys("Vitamin A" + Keys.CONTROL + Keys.ENTER)  # Ctrl+Enter sends
    page.wait_answer(10)
    assert script.bodies[-1]["template_inputs"]["options"] == {"A": "Vitamin C", "B": "Vitamin A", "D": "Vitamin D"}


def test_a_required_field_left_empty_is_named_before_sending(served, script, browser):
    page = browser.page(served.url)
    page.choose("triage")
    assert page.find("label[for=tpl-case]").text.endswith("(required)")
    assert page.find("#tpl-case").get_attribute("required") is not None
    page.send()
    assert page.find("#status").text == "Fill in “case” first: this form needs it."
    assert active_id(page) == "tpl-case" and script.bodies == [] and not page.answers()


@pytest.mark.parametrize("events,note,mark", [
    # the server dies mid-body: Chromium's reader fails with a TypeError after the headers
    ([event("Give amoxicillin 5"), 0.3, event("00 mg every 8 hours"), 0.3, DROP], "cut off", "CUT OFF, incomplete"),
    # the server ends the stream with an error event after part of the answer
    ([event("Give amoxicillin 5"), event("00 mg every 8 hours"),
      'data: {"error": {"message": "The server failed on this request. The answer above is cut off.", '
      '"type": "server_error", "param": null, "code": "server_error"}}\n\n', DONE], "failed", "FAILED, incomplete"),
], ids=["dropped", "failed"])
def test_an_answer_that_broke_off_is_marked_incomplete(served, script, browser, events, note, mark):
    script.answer(events)
    page = browser.page(served.url)
    page.ask("Amoxicillin dose for an adult?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done").startswith(note)
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "incomplete" in warning.text and "Answered" not in page.find("#status").text
    assert copied(page, answer) == f"[{mark}] Give amoxicillin 500 mg every 8 hours"
    assert f"A ({mark}): Give amoxicillin 500 mg every 8 hours" in saved(browser)
    assert page.find("#prompt").get_attribute("value") == "Amoxicillin dose for an adult?"  # to ask again


def test_a_stopped_answer_is_marked_incomplete(served, script, browser):
    script.answer(slow(["Give amoxicillin 500 mg", " every 8 hours", " and reduce", " the dose", " in CKD."], 0.5)
                  + [event(finish="stop"), DONE])
    page = browser.page(served.url)
    page.ask("Amoxicillin dose for an adult?")
    page.wait(lambda: "amoxicillin" in page.find("#log .answer-text").text, 10, "the answer's first words")
    page.find("#stop").click()
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "stopped"
    shown = text_of(answer, ".answer-text").strip()
    assert shown.startswith("Give amoxicillin 500 mg") and not shown.endswith("in CKD.")
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "incomplete" in warning.text
    assert page.find("#status").text == "Stopped: the answer is incomplete."
    assert copied(page, answer) == "[STOPPED, incomplete] " + shown
    assert "A (STOPPED, incomplete): " + shown in saved(browser)


def test_copy_is_off_while_the_answer_is_still_being_written(served, script, browser):
    """Copy during the stream gave the text so far, unmarked, as if it were the answer."""
    script.answer(slow(["Give amoxicillin 500 mg", " every 8 hours", " and reduce", " the dose in CKD."], 0.5)
                  + [event(finish="stop"), DONE])
    page = browser.page(served.url)
    page.ask("Amoxicillin dose for an adult?")
    page.wait(lambda: "amoxicillin" in page.find("#log .answer-text").text, 10, "the answer's first words")
    answer = page.last()
    copy = answer.find_element("css selector", ".copy")
    assert not answer.get_attribute("data-done") and not copy.is_enabled()
    page.driver.execute_script(CLIPBOARD + "window.__copied = null;")
    copy.click()  # a click on it does nothing
    assert page.driver.execute_script("return window.__copied") is None
    assert page.wait_answer(10).get_attribute("data-done") == "done"
    assert copied(page, answer) == "Give amoxicillin 500 mg every 8 hours and reduce the dose in CKD."


def test_an_answer_cut_at_the_answer_length_is_marked_on_copy_and_in_the_transcript(served, script, browser):
    script.answer([event("Start with 0.5 mg"), event(" IM, then", finish="length"), usage(100, 24), DONE])
    page = browser.page(served.url)
    page.max_tokens(24)
    page.ask("Adrenaline dose in anaphylaxis?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "cut at the answer length limit"
    assert copied(page, answer) == "[CUT AT THE ANSWER LENGTH] Start with 0.5 mg IM, then"
    transcript = saved(browser)
    assert "A (CUT AT THE ANSWER LENGTH): Start with 0.5 mg IM, then" in transcript
    assert "\nA: Start" not in transcript


def test_an_answer_cut_at_the_answer_length_says_so_on_it_and_stays_in_the_conversation(served, script, browser):
    """The clinician read the cut answer: the next question's conversation holds it as it stands (as chat's does, so
    "go on" works), and the answer itself says it was cut and kept (a small note under it was all it said)."""
    script.answer([event("Start with 0.5 mg"), event(" IM, then", finish="length"), usage(100, 24), DONE])
    page = browser.page(served.url)
    page.max_tokens(24)
    page.ask("Adrenaline dose in anaphylaxis?")
    answer = page.wait_answer(10)
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "incomplete" in warning.text and "stays in the conversation" in warning.text
    assert page.find("#prompt").get_attribute("value") == ""  # answered: the box is free for the next question
    script.answer(WHOLE)
    page.ask("Go on.")
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    assert assistant_turns(script.bodies[-1]) == ["Start with 0.5 mg IM, then"]


def test_an_answer_cut_at_the_answer_length_is_not_called_answered(served, script, browser):
    """The status line of an answer cut at the answer length began "Answered, up to the answer length limit.": read
    at a glance, a truncated answer passed for a complete one."""
    page = browser.page(served.url)
    page.ask("Paracetamol dose?")
    page.wait_answer(10)
    status = page.find("#status")
    assert status.text == "Answered." and "warn" not in status.get_attribute("class")
    script.answer([event("Start with 0.5 mg"), event(" IM, then", finish="length"), usage(100, 24), DONE])
    page.max_tokens(24)
    page.ask("Adrenaline dose in anaphylaxis?")
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    status = page.find("#status")
    assert "Answered" not in status.text and status.text.startswith("Incomplete answer")
    assert "cut at the answer length limit" in status.text and "go on" in status.text
    assert "Longest answer (tokens)" in status.text  # the page's own control for a longer answer
    assert "warn" in status.get_attribute("class")  # set apart from a whole answer's status
    assert status.value_of_css_property("color") != page.find("#prompt-hint").value_of_css_property("color")


@pytest.mark.parametrize("finish", ["content_filter", "tool_calls"])
def test_an_answer_that_ended_for_another_reason_is_not_called_answered(served, script, browser, finish):
    """A finish reason other than stop or length (a content filter's; calls where the page asked for none) was read
    as a whole answer: "Answered.", Copy and the transcript unmarked."""
    script.answer([event("Give 0.5 mg"), event(finish=finish), DONE])
    page = browser.page(served.url)
    page.ask("Adrenaline dose in anaphylaxis?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == f"ended early, not as a whole answer (finish reason: {finish})"
    status = page.find("#status")
    assert "Answered" not in status.text and "incomplete" in status.text and "warn" in status.get_attribute("class")
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "incomplete" in warning.text
    assert copied(page, answer) == "[ENDED EARLY, may be incomplete] Give 0.5 mg"
    assert "A (ENDED EARLY, may be incomplete): Give 0.5 mg" in saved(browser)


def test_a_form_answer_cut_at_the_answer_length_says_so_not_unformatted(served, script, browser):
    """A form's reply cut at the answer length was called not in the form's format ("ask again", which gives the same
    cut), and showed the server's fix for the CLI ("raise max_tokens (--max-tokens)")."""
    cli_fix = ("the reply was cut at the token limit before it ended, so its answer may be incomplete: raise "
               "max_tokens (--max-tokens) and ask again")  # an older server's words: the page does not show them
    script.answer([event("Answer: C (Vitamin"), event(finish="length", **parsed(False, error=cli_fix)),
                   usage(200, 4), DONE])
    page = browser.page(served.url)
    page.max_tokens(4)
    page.choose("mcq")
    page.find("#fill-example").click()
    page.send()
    answer = page.wait_answer(10)
    done = answer.get_attribute("data-done")
    assert done == "cut at the answer length limit: raise the answer length and send again"
    status = page.find("#status").text
    assert "answer length" in status and "form's format" not in status and "Answered" not in status
    warning = answer.find_element("css selector", ".ending")
    assert warning.is_displayed() and "Raise the answer length" in warning.text
    assert not answer.find_elements("css selector", ".choice-letter")
    assert "--max-tokens" not in page.find("body").get_attribute("textContent")
    assert "form's format" not in answer.text and "No answer was read" in answer.text
    assert copied(page, answer) == "[CUT AT THE ANSWER LENGTH] Answer: C (Vitamin"
    transcript = saved(browser)
    assert "A (CUT AT THE ANSWER LENGTH): Answer: C (Vitamin" in transcript and "--max-tokens" not in transcript


def test_a_line_after_form_answers_says_the_model_does_not_see_them(served, script, browser):
    page = browser.page(served.url)
    page.choose("mcq")
    page.find("#fill-example").click()
    for n in (1, 2):  # two form answers in a row: one line, after the last
        script.answer([event("Answer: C"), event(finish="stop", **parsed(True, "C")), DONE])
        page.send()
        page.wait(lambda: len(page.answers()) == n and page.last().get_attribute("data-done"), 10, "the form's answer")
    dividers = page.all("#log .divider")
    assert len(dividers) == 1 and dividers[0].is_displayed()
    assert dividers[0].text.startswith("The model does not see the form answers above")
    page.choose("")
    script.answer(WHOLE)
    page.ask("Why not vitamin A?")
    page.wait(lambda: len(page.answers()) == 3 and page.last().get_attribute("data-done"), 10, "the chat answer")
    assert script.bodies[-1]["messages"] == [PREAMBLE, {"role": "user", "content": "Why not vitamin A?"}]  # as said
    order = [e.get_attribute("class") for e in page.all("#log > li")]
    assert order == ["turn", "turn", "divider", "turn"]
    transcript = saved(browser)
    assert "(The model does not see the form answers above" in transcript
    assert transcript.index("(The model does not see") > transcript.rindex("A: Answer: C")


@pytest.mark.parametrize("before,prompt,asked,mode,headers,note,says", [
    # the prompt left 24 tokens of the 1024 and the clinician asked for 200: the conversation filled the context
    (1, CONTEXT - 24, 200, "", {}, "cut off: the conversation filled the model's context",
     "Save it, then start a New conversation"),
    # ... while the model was still reasoning: no answer, and a longer answer length would not give one
    (1, CONTEXT - 24, 200, "", {"x-edgemed-think": "open"}, "no answer: the conversation filled the model's context",
     "Save it, then start a New conversation"),
    # the first question filled it by itself: a new conversation would fill the same way; the question is to be
    # shortened
    (0, CONTEXT - 24, 200, "", {}, "cut off: the question filled the model's context", "Shorten it, and send again"),
    (0, CONTEXT - 24, 200, "", {"x-edgemed-think": "open"}, "no answer: the question filled the model's context",
     "Shorten it, and send again"),
    # a form's own text filled it: there is no conversation to start anew, the text is to be shortened
    (0, CONTEXT - 24, 200, "mcq", {}, "cut off: the form's text filled the model's context", "Shorten it"),
    # the clinician's own limit, with room to spare
    (0, 100, 24, "", {}, "cut at the answer length limit", "cut at the answer length limit"),
], ids=["context-full", "context-full-reasoning", "question-full", "question-full-reasoning", "form-text-full",
        "own-limit"])
def test_an_answer_cut_by_the_context_says_so_not_the_length_limit(served, script, browser, before, prompt, asked,
                                                                    mode, headers, note, says):
    page = browser.page(served.url)
    for n in range(before):  # earlier questions and answers: the conversation the model reads grew
        script.answer(WHOLE)
        page.ask(f"Paracetamol dose, question {n + 1}?")
        page.wait(lambda: len(page.answers()) == n + 1 and page.last().get_attribute("data-done"), 10, "an answer")
    script.answer([event("Start with"), event(" 0.5 mg", finish="length", **parsed(False, error="cut")),
                   usage(prompt, 24), DONE], headers)
    page.max_tokens(asked)
    if mode:
        page.choose(mode)
        page.find("#fill-example").click()
        page.send()
    else:
        page.ask("And the dose for a child?")
    page.wait(lambda: len(page.answers()) == before + 1 and page.last().get_attribute("data-done"), 10, "the answer")
    answer = page.last()
    assert script.bodies[-1]["stream_options"] == {"include_usage": True}
    assert answer.get_attribute("data-done") == note
    status = page.find("#status").text
    assert says in status
    if not before:  # nothing to save and start anew from
        assert "New conversation" not in status and "New conversation" not in answer.text


def refuse_as_too_long(script) -> None:
    script.refuse(400, "context_length_exceeded", "The prompt is 1100 tokens, which leaves no room for an answer in the "
                  "context window of 1024 tokens. Fix: shorten the prompt, or start the server with a larger --ctx or "
                  "fewer --slots.")


def test_a_conversation_too_long_for_the_model_says_save_and_start_anew(served, script, browser):
    page = browser.page(served.url)
    page.ask("Paracetamol dose for an adult?")
    page.wait_answer(10)
    refuse_as_too_long(script)
    page.ask("And the dose for a child?")
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    answer = page.last()
    assert "This conversation is too long for the model: Save it, then start a New conversation." in answer.text
    assert "--ctx" not in answer.text and "--slots" not in answer.text
    assert "A: none. This conversation is too long for the model" in saved(browser)


def test_a_first_question_too_long_for_the_model_says_shorten_it(served, script, browser):
    """The first question of a conversation that the context cannot take: saving and starting a new conversation (the
    advice for a long conversation) would give the same refusal, so the page says to shorten the question."""
    refuse_as_too_long(script)
    page = browser.page(served.url)
    page.ask("Patient notes: " + "BP 150/95, HR 88. " * 40 + "Dose?")
    answer = page.wait_answer(10)
    assert "This question is too long for the model: shorten it, and send again." in answer.text
    shown = answer.text + page.find("#status").text
    assert "New conversation" not in shown and "--ctx" not in shown
    assert "A: none. This question is too long for the model: shorten it" in saved(browser)
    assert page.find("#prompt").get_attribute("value").startswith("Patient notes:")  # to shorten, and send again


def test_the_answer_being_written_stays_in_view(served, script, browser):
    lines = [x for i in range(40) for x in (event(f"Line {i}: monitor the blood pressure and the heart rate.\n"), 0.01)]
    page = browser.page(served.url)
    driver = browser.driver
    for n in (1, 2, 3):
        script.answer(lines + [event("The end.", finish="stop"), DONE])
        page.ask(f"Question {n}?")
        page.wait(lambda: len(page.answers()) == n and page.last().get_attribute("data-done"), 20, "the answer")
        bottom, height = driver.execute_script("""
            const all = document.querySelectorAll('#log .answer-text'), last = all[all.length - 1];
            return [last.getBoundingClientRect().bottom, window.innerHeight];""")
        assert 0 < bottom <= height, f"answer {n}: its end is at {bottom} px, the window is {height} px high"


def test_a_stopped_answer_goes_back_marked_and_a_failed_question_is_said_to_be_left_out(served, script, browser):
    """After Stop the follow-up ("for her?") reached the model without the patient it was about, and nothing on the
    page said so: what is on screen as one conversation is now what the model is sent, a cut answer marked as cut,
    and a question that got no answer has a line under it saying the model does not see it."""
    script.answer(slow(["Warfarin in an 82-year-old", " with eGFR 18", " needs", " a lower dose."], 0.5)
                  + [event(finish="stop"), DONE])
    page = browser.page(served.url)
    page.ask("Patient: 82-year-old woman, eGFR 18, on warfarin. Her anticoagulation?")
    page.wait(lambda: "Warfarin" in page.find("#log .answer-text").text, 10, "the answer's first words")
    page.find("#stop").click()
    stopped = text_of(page.wait_answer(10), ".answer-text").strip()
    assert not page.all("#log .divider")  # it is the model's context: no line says otherwise
    script.answer(WHOLE)
    page.ask("What dose do you suggest for her?")
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    assert script.bodies[-1]["messages"] == [
        PREAMBLE, {"role": "user", "content": "Patient: 82-year-old woman, eGFR 18, on warfarin. Her anticoagulation?"},
        {"role": "assistant", "content": "[STOPPED, incomplete] " + stopped},
        {"role": "user", "content": "What dose do you suggest for her?"}]

    script.refuse(500, "server_error", "The server failed on this request.")
    page.ask("And her INR target?")
    page.wait(lambda: len(page.answers()) == 3 and page.last().get_attribute("data-done"), 10, "the third answer")
    dividers = page.all("#log .divider")
    assert len(dividers) == 1 and dividers[0].text.startswith("The model does not see the question above")
    assert [e.get_attribute("class") for e in page.all("#log > li")] == ["turn", "turn", "turn", "divider"]
    assert page.find("#prompt").get_attribute("value") == "And her INR target?"  # to send again
    transcript = saved(browser)
    assert transcript.index("(The model does not see the question above") > transcript.index("Q: And her INR target?")
    script.answer(WHOLE)
    page.ask("Her INR target?")
    page.wait(lambda: len(page.answers()) == 4 and page.last().get_attribute("data-done"), 10, "the fourth answer")
    assert [m["content"] for m in script.bodies[-1]["messages"] if m["role"] == "user"][-2:] == [
        "What dose do you suggest for her?", "Her INR target?"]


def test_bidi_controls_are_shown_copied_and_saved_escaped_in_the_order_written(served, script, browser):
    """U+202E reversed "gm 01" into "10 mg" on screen while the text, Copy and Save held "gm 01"."""
    script.answer([event("Give warfarin \u202e gm 01\u202c daily."), event(finish="stop"), DONE])
    page = browser.page(served.url)
    page.ask("Dose \u2067of\u2069 warfarin?")
    answer = page.wait_answer(10)
    assert text_of(answer, ".answer-text") == "Give warfarin \\u202e gm 01\\u202c daily."
    assert page.find("#log .question-text").get_attribute("textContent") == "Dose \\u2067of\\u2069 warfarin?"
    assert copied(page, answer) == "Give warfarin \\u202e gm 01\\u202c daily."
    transcript = saved(browser)
    assert "A: Give warfarin \\u202e gm 01\\u202c daily." in transcript and "Q: Dose \\u2067of\\u2069" in transcript
    assert not any(c in transcript for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    assert script.bodies[-1]["messages"][-1]["content"] == "Dose \u2067of\u2069 warfarin?"  # the model gets the text


def test_the_key_is_kept_in_no_storage_a_reload_asks_again(served, script, browser):
    """sessionStorage came back with a restored or duplicated tab: the next person at the workstation was signed in."""
    page = _signed_in(served, script, browser)
    driver = browser.driver
    assert driver.execute_script("return Object.keys(sessionStorage)") == []
    page.ask("Hello")
    page.wait_answer(10)
    page.open().ready()
    page.wait(lambda: not page.find("#key-panel").get_attribute("hidden"), 10, "the key prompt")
    assert page.find("#ask").get_attribute("hidden") and not page.find("#forget-key").is_displayed()


def test_a_key_with_an_invisible_character_is_named_and_not_kept(served, script, browser):
    """A key pasted with U+200B said "The server cannot be reached", and stayed to jam every reload of the tab."""
    script.require(KEY)
    page = browser.page(served.url)
    page.find("#key").send_keys(KEY + "\u200b\n")
    page.wait(lambda: page.find("#key-error").text, 10, "the key's error")
    assert page.find("#key-error").text == "That key holds a character a key cannot have (U+200B): paste it again " \
                                           "without it."
    assert not page.find("#key-panel").get_attribute("hidden") and page.find("#ask").get_attribute("hidden")
    assert "cannot be reached" not in page.find("#status").text
    assert browser.driver.execute_script("return Object.keys(sessionStorage)") == []
    page.find("#key").send_keys(KEY + "\n")  # pasted again without it
    page.wait(lambda: not page.find("#ask").get_attribute("hidden"), 10, "the page after the key")


def test_each_answer_names_its_model_and_a_change_of_model_is_marked(served, script, browser):
    """The saved transcript named the model picked at saving for every answer, and the screen named none."""
    from selenium.webdriver.support.ui import Select

    other = MODEL + ":spec2"
    script.models = [MODEL, other]
    page = browser.page(served.url)
    page.ask("Paracetamol dose?")
    page.wait_answer(10)
    Select(page.find("#model")).select_by_value(other)
    script.answer(WHOLE)
    page.ask("And for a child?")
    page.wait(lambda: len(page.answers()) == 2 and page.last().get_attribute("data-done"), 10, "the second answer")
    assert [b["model"] for b in script.bodies] == [MODEL, other]
    assert [e.text for e in page.all("#log .meta .model")] == [MODEL, other]
    dividers = page.all("#log .divider")
    assert len(dividers) == 1 and dividers[0].text.startswith(f"Model changed to {other}")
    transcript = saved(browser)
    assert transcript.startswith(f"edgemed conversation — models {MODEL}, {other}\n")
    assert f"Request id: {1:032x}, model {MODEL}" in transcript and f"Request id: {2:032x}, model {other}" in transcript
    assert transcript.index(f"(Model changed to {other}") < transcript.index("Q: And for a child?")


#: The server's own messages for these refusals: the operator's fixes (--slots, --max-body).
BUSY = ("The model is busy: 1 requests are already running or waiting. Fix: retry in 14 s, or start the server with "
        "more slots or a longer queue")
TOO_LARGE = "The request body is over 1048576 bytes. Fix: shorten the request, or start the server with a larger --max-body."


@pytest.mark.parametrize("status,code,message,headers,says", [
    (429, "server_overloaded", BUSY, {"retry-after": "14"}, "The model is busy with other questions: send again in about 14 s."),
    (413, "request_too_large", TOO_LARGE, {}, "This text is too long to send: shorten it, and send again."),
], ids=["busy", "too-large"])
def test_refusals_a_clinician_meets_are_in_their_words(served, script, browser, status, code, message, headers, says):
    script.answer([], headers)
    script.refuse(status, code, message)
    page = browser.page(served.url)
    page.ask("Paracetamol dose?")
    answer = page.wait_answer(10)
    assert says in answer.text and "Fix:" not in answer.text and "--max-body" not in answer.text
    assert page.find("#prompt").get_attribute("value") == "Paracetamol dose?"


def test_a_specialty_removed_mid_conversation_is_said_in_the_clinicians_words(served, script, browser):
    """An adapter removed from the server while its name was still picked showed the server's message, which names
    its API ("GET /v1/models lists them")."""
    from selenium.webdriver.support.ui import Select

    other = MODEL + ":cardiology"
    script.models = [MODEL, other]
    page = browser.page(served.url)
    Select(page.find("#model")).select_by_value(other)
    message = (f"The model '{other}' is not served here. Fix: use one of '{MODEL}' (GET /v1/models lists them).")
    script.refuse(404, "model_not_found", message)
    page.ask("Troponin threshold?")
    answer = page.wait_answer(10)
    error = answer.find_element("css selector", ".structured .error")
    assert error.text == (f"The model chosen for this question ({other}) is no longer available on this server: pick "
                          "another under “Model”, or reload the page to see the models available now.")
    assert "GET /v1/models" not in answer.text and "Fix:" not in answer.text  # folded, not on the answer
    detail = answer.find_element("css selector", ".structured details.detail")
    assert detail.find_element("css selector", "summary").text == "Technical detail (for IT)"
    assert detail.find_element("css selector", "p").get_attribute("textContent") == message
    assert page.find("#prompt").get_attribute("value") == "Troponin threshold?"  # to send again with another model
    assert f"(Technical detail: {message})" in saved(browser)


@pytest.mark.parametrize("code,says", [
    ("unavailable", "The model is not answering now"),
    ("grammar_too_costly", "could not write an answer in the required format"),
    ("generation_failed", "The model failed while answering"),
])
def test_an_error_event_in_the_stream_is_said_in_the_clinicians_words(served, script, browser, code, says):
    """The server's error event mid-stream (shutting down, a grammar too costly to follow, a failed generation) was
    shown in its own words, naming its fixes."""
    message = f"Generation stopped: the test's {code}. Fix: retry with a larger --slots."
    script.answer(['data: ' + json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                                    "code": code}}) + "\n\n", DONE])
    page = browser.page(served.url)
    page.ask("Paracetamol dose?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "error"
    assert says in answer.find_element("css selector", ".structured .error").text
    assert "Fix:" not in answer.text and "--slots" not in answer.text
    detail = answer.find_element("css selector", ".structured details.detail p")
    assert detail.get_attribute("textContent") == message
    status = page.find("#status")
    assert "Answered" not in status.text and "warn" in status.get_attribute("class")


def test_a_server_out_of_reach_at_start_is_said_in_the_clinicians_words(served, script, browser):
    """The first load, with no answer from the server, said "Is `edgemed serve` running?": the operator's words,
    on the clinician's screen."""
    driver = browser.driver
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/ui/info"]})
    try:
        page = ui_kit.Page(driver, served.url).open()
        page.wait(lambda: page.find("#status").text not in ("", "Loading…"), 10, "the page's first status")
        status = page.find("#status")
        assert status.text.startswith("The assistant cannot be reached") and "contact IT" in status.text
        assert "edgemed serve" not in status.text and "warn" in status.get_attribute("class")
        detail = page.find("#status-detail")
        assert detail.is_displayed() and detail.find_element("css selector", "summary").text.startswith(
            "Technical detail")
        assert "`edgemed serve`" in page.find("#status-detail-text").get_attribute("textContent")
        assert not page.find("#status-detail-text").is_displayed()  # folded until asked for
    finally:
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
    page = browser.page(served.url)  # the server back: the page starts, and the detail goes with the problem
    assert page.find("#status").text.startswith("Ready.") and not page.find("#status-detail").is_displayed()


def test_a_server_that_cannot_be_reached_is_said_so_not_failed_to_fetch(served, script, browser):
    page = browser.page(served.url)
    # what Chromium's fetch does when nothing listens on the port any more
    page.driver.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));")
    page.ask("Paracetamol dose?")
    answer = page.wait_answer(10)
    assert "The server cannot be reached (it may have been stopped): send again when it is back." in answer.text
    assert "Failed to fetch" not in answer.text


@pytest.mark.parametrize("status,code,headers,says", [
    (400, None, {}, "The server did not accept this question as the page sent it: send it again; if it happens "
                    "again, contact IT or whoever runs the assistant, with the request id."),
    (400, "invalid_template", {}, "The server did not accept this question as the page sent it: send it again;"),
    (400, "max_tokens_too_large", {}, "The answer length asked for is above this server's limit: lower “Longest "
                                      "answer (tokens)”, or leave it empty, and send again."),
    (403, None, {}, "The server does not allow this page to ask it questions: contact IT or whoever runs the "
                    "assistant, with the request id."),
    (413, None, {}, "This text is too long to send: shorten it, and send again."),
    (429, None, {"retry-after": "9"}, "The model is busy with other questions: send again in about 9 s."),
    (429, None, {}, "The model is busy with other questions: send again in a moment."),
    (502, None, {}, "The server could not answer this question: send it again in a moment;"),
], ids=["400", "400-unknown-code", "400-answer-length", "403", "413", "429", "429-no-retry-after", "502"])
def test_a_refusal_without_a_code_the_page_knows_is_in_the_clinicians_words(served, script, browser, status, code,
                                                                              headers, says):
    """A refusal with no code, or one the page does not know (a proxy's bare status, a check before the model), was
    shown in the server's own words, which name its flags and its API, as the answer's error."""
    message = f"Refused ({status}). Fix: send 'max_tokens' under --max-body, or restart the server with --slots 4."
    script.answer([], headers)
    script.refuse(status, code, message)
    page = browser.page(served.url)
    page.ask("Paracetamol dose?")
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "error"
    assert answer.find_element("css selector", ".structured .error").text.startswith(says)
    assert "Fix:" not in answer.text and "--" not in answer.text and "max_tokens" not in answer.text
    detail = answer.find_element("css selector", ".structured details.detail")
    assert detail.find_element("css selector", "summary").text == "Technical detail (for IT)"
    assert detail.find_element("css selector", "p").get_attribute("textContent") == message
    assert page.find("#prompt").get_attribute("value") == "Paracetamol dose?"  # to send again
    assert f"(Technical detail: {message})" in saved(browser)


#: The real server's 401 (``serve.middleware``): the operator's header and flag.
UNAUTHORIZED = ("Missing or incorrect API key. Fix: send 'Authorization: Bearer KEY' with a key from the server's "
                "--api-key-file.")


@pytest.mark.parametrize("signed_in,says,status", [
    (False, "This page is not signed in to the server: ask your IT contact for the API key, and enter it here.",
     "The server asks for a key, so the conversation on screen was cleared."),
    (True, "The key was refused (it may have been changed or withdrawn): enter the current key; ask your IT contact "
           "for it if you do not have it.", "The key was refused, so the conversation on screen was cleared."),
], ids=["no-key", "key-withdrawn"])
def test_a_401_is_said_in_the_clinicians_words(served, script, browser, signed_in, says, status):
    """A 401 on a question put the server's words in the key panel ("The key was refused: Missing or incorrect API
    key. Fix: send 'Authorization: Bearer KEY' ..."): the operator's header and flag, not what the clinician is to
    do; and a page that held no key (the server asked for none when it loaded) said its key was refused."""
    page = _signed_in(served, script, browser) if signed_in else browser.page(served.url)
    script.refuse(401, "invalid_api_key", UNAUTHORIZED)
    page.ask("Patient C, 70, fall at home: head CT?")
    page.wait(lambda: not page.find("#key-panel").get_attribute("hidden"), 10, "the key prompt")
    assert page.find("#key-error").text == says
    assert page.find("#status").text.startswith(status)
    assert "Patient C" not in browser.driver.execute_script("return document.body.textContent")
    assert page.find("#status-detail").is_displayed()  # the server's words, folded, for IT
    assert page.find("#status-detail-text").get_attribute("textContent") == UNAUTHORIZED
    assert not page.find("#status-detail-text").is_displayed()


@pytest.mark.parametrize("typed", ["0", "-5", "2.5"])
def test_an_answer_length_that_is_no_whole_number_of_1_or_more_is_refused_in_the_page(served, script, browser, typed):
    """0 and -5 were dropped for the server's default without a word, and 2.5 sent 2."""
    page = browser.page(served.url)
    page.max_tokens(typed)
    page.ask("Paracetamol dose?")
    assert page.find("#status").text.startswith("Longest answer (tokens): give a whole number of 1 or more")
    assert active_id(page) == "max-tokens" and script.bodies == [] and not page.answers()


def test_an_answer_length_in_exponent_form_is_the_number_typed(served, script, browser):
    """parseInt read "1e2", which the number box takes as 100, as 1."""
    page = browser.page(served.url)
    page.max_tokens("1e2")
    page.ask("Paracetamol dose?")
    page.wait_answer(10)
    assert script.bodies[-1]["max_tokens"] == 100
