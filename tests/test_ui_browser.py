"""The clinician page of ``edgemed serve`` in a real headless Chromium against a real server on SmolLM2.

Covers: the page and its assets (CSP and the other headers; nothing but same-origin files); the model card (with the
model's license) before the first question; a streamed free question sent with Enter, with its audit request id;
the ``mcq`` form and the parsed letter the server returned; a ``<think>`` block folded away from the answer; stopping a long answer (the slot is freed); a server with keys (refused
without one, works with one, the key kept in no storage of the browser); hostile input and hostile model output shown
as text, never run; no request outside the server's origin (the browser's own network log); a page on another
origin that posts to the server is refused; no field a clinician types in is spell-checked; ``--no-ui``; an answer
cut by the room left in the context is told from one cut at the answer length asked for, and a first question too long
for the context says to shorten it; an MCQ answer cut at the answer length says so, never the CLI's --max-tokens.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from serve_kit import wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

import ui_kit
from ui_kit import (
    MODEL,
    Browser,
    Page,
    audit_records,
    outside,
    page_server,
    spellchecked,
    stored,
    unlabelled,
)

CARD = {"license": "apache-2.0", "intended_use": "Answering exam-style medical questions for the test suite.",
        "intended_users": ["Test engineers"], "out_of_scope_use": "Patients.",
        "known_limitations": ["Tiny model: often wrong"]}
KEY = "test-key-" + "x" * 24
HOSTILE = '</script><img src=x onerror="window.__pwned=1">'
#: SmolLM2 answers this (greedy) with HTML of its own: <img src="https://example.com/image.png" onerror="window.__pwned=1"></script>
HOSTILE_ASK = 'Write the HTML tag <img src=x onerror="window.__pwned=1"> and then </script>'

#: SmolLM2's chat template's own default system message. The two tests that read what SmolLM2 (greedy) writes of the
#: tags it is asked for have the page's chat send it in place of the safety preamble: the prompt is the one the model
#: wrote them for, and under the preamble it declines. The preamble itself is tests/test_page_streams.py's.
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture
def smollm_system(monkeypatch):
    from edgemed.serve import page

    monkeypatch.setattr(page, "safety_preamble", lambda: SMOLLM_SYSTEM)


#: Records the length of the last answer's text at every change the page makes to it (in the page, so no change is
#: missed between two polls): a streamed answer grows in several steps, a buffered one appears at once.
WATCH_ANSWER = """
window.__lengths = [];
new MutationObserver(() => {
  const all = document.querySelectorAll('#log .answer-text');
  if (all.length) window.__lengths.push(all[all.length - 1].textContent.length);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    with page_server(smollm2_gguf, tmp_path_factory.mktemp("ui-audit") / "audit.jsonl", card=CARD,
                     default_max_tokens=24) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    ui_kit.need_browser()
    with ui_kit.ui.chromium() as driver:
        yield Browser(driver)


# -- the page as files: no browser needed ---------------------------------------------------------------------
def test_page_and_assets_carry_a_strict_csp_and_come_from_the_package(server):
    for path in ("/", "/ui/app.js", "/ui/think.js", "/ui/app.css", "/ui/icon.svg"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        for rule in ("default-src 'self'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'",
                     "require-trusted-types-for 'script'"):
            assert rule in csp, (path, rule)
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
    html = httpx.get(server.url + "/").text
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/think.js" defer>',
                                                    '<script src="/ui/app.js" defer>']  # no inline script
    assert " style=" not in html and "<style" not in html
    for path in ("/", "/ui/app.js", "/ui/think.js", "/ui/app.css"):
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", httpx.get(server.url + path).text), path
    assert not any("innerHTML" in httpx.get(server.url + path).text for path in ("/ui/app.js", "/ui/think.js"))


def test_info_gives_the_card_and_the_template_index(server):
    info = httpx.get(server.url + "/ui/info").json()
    assert info["model"] == MODEL and info["card"]["intended_use"] == CARD["intended_use"]
    assert info["card"]["license"] == "apache-2.0"
    from edgemed.templates.library import safety_preamble

    assert info["preamble"] == safety_preamble()  # what the page's chat sends first as its system message
    templates = {t["name"]: t for t in info["templates"]}
    assert templates["mcq"]["kind"] == "choice" and templates["mcq"]["choices_from"] == "options"
    assert [f["kind"] for f in templates["mcq"]["fields"]] == ["long", "options"]
    assert templates["triage"]["columns"] == ["urgency", "red_flags", "action"]
    assert {f["name"]: f["kind"] for f in templates["patient_education"]["fields"]}["reading_level"] == "line"


def test_no_ui_serves_the_api_alone(smollm2_gguf, tmp_path):
    with page_server(smollm2_gguf, tmp_path / "audit.jsonl", ui=False) as srv:
        assert httpx.get(srv.url + "/").status_code == 404
        assert httpx.get(srv.url + "/ui/app.js").status_code == 404
        assert httpx.get(srv.url + "/ui/info").status_code == 404
        assert httpx.get(srv.url + "/v1/models").status_code == 200


def test_cli_no_ui_and_the_bind_rule(monkeypatch, smollm2_gguf):
    from serve_kit import batcher_kwargs

    from edgemed.serve import config as config_module
    from edgemed.serve.security import ApiKeys

    made = []
    real = config_module.ServeConfig
    monkeypatch.setattr(config_module, "ServeConfig", lambda **kw: made.append(real(**kw)) or made[-1])
    _, result = batcher_kwargs(monkeypatch, ["--no-ui", "--port", "0", str(smollm2_gguf)])
    assert made and made[-1].ui is False and not made[-1].page_enabled, result.output
    _, result = batcher_kwargs(monkeypatch, ["--port", "0", str(smollm2_gguf)])
    assert len(made) == 2 and made[-1].page_enabled, result.output
    keys = ApiKeys.from_lines([KEY])
    assert real(model_id="m", bundle_digest="d", host="0.0.0.0", api_keys=keys).page_enabled
    off = object.__new__(real)  # a public bind without keys (check_bind refuses it at construction): never the page
    object.__setattr__(off, "host", "0.0.0.0"), object.__setattr__(off, "api_keys", None), object.__setattr__(off, "ui", True)
    assert not off.page_enabled


def test_cli_reads_the_card_of_a_bundle_and_none_of_a_plain_file(tmp_path):
    from edgemed.cli.serve import _card
    from edgemed.packaging.ref import DIRECTORY, FILE, ModelRef

    card = {k: v for k, v in CARD.items() if k != "license"}
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "b", "model": {"license": "apache-2.0"}, "card": card}))
    assert _card(ModelRef(DIRECTORY, tmp_path, "b")) == {**card, "license": "apache-2.0"}  # the model's own license
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "b", "model": {"license": ["not", "text"]}, "card": card}))
    assert _card(ModelRef(DIRECTORY, tmp_path, "b")) == card
    assert _card(ModelRef(FILE, tmp_path / "m.gguf", "m", model_path=tmp_path / "m.gguf")) == {}


# -- in the browser -------------------------------------------------------------------------------------------
def test_free_question_streams_with_its_request_id_and_the_card_first(server, browser):
    page = browser.page(server.url)
    card = page.find("#card").text
    assert CARD["intended_use"] in card and "Test engineers" in card and "Tiny model: often wrong" in card
    assert page.find('#card-fields dd[data-field="license"]').text == "apache-2.0"
    assert page.find("#mode").get_attribute("value") == ""  # the chat comes first
    assert browser.driver.switch_to.active_element.get_attribute("id") == "prompt"  # type at once, no mouse
    page.max_tokens(32)
    browser.driver.execute_script(WATCH_ANSWER)
    page.ask("Name three symptoms of anemia.")  # typed, then Enter
    answer = page.wait_answer()
    text = answer.find_element("css selector", ".answer-text").get_attribute("textContent")
    assert text.strip()
    lengths = browser.driver.execute_script("return window.__lengths")
    partial = sorted({n for n in lengths if 0 < n < len(text)})
    assert len(partial) >= 2, f"the answer did not arrive in pieces: text lengths seen {lengths}"
    request_id = answer.find_element("css selector", ".request-id").text
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert "never replaces" in answer.find_element("css selector", ".safety").text
    assert answer.find_element("css selector", ".think").get_attribute("hidden")  # no <think> from SmolLM2: folded away
    record = [r for r in audit_records(server.audit_path) if r.get("request_id") == request_id]
    assert record and record[0]["endpoint"] == "chat" and record[0]["status"] == 200
    assert "anemia" not in server.audit_path.read_text()  # the audit keeps no text by default
    assert stored(browser.driver) == {"local": [], "session": [], "indexeddb": []}
    assert unlabelled(browser.driver) == []


def _ask_mcq(server, browser, inputs: dict):
    """The mcq form filled with ``inputs`` and sent (16 tokens); the answer element once it is done."""
    page = browser.page(server.url)
    page.choose("mcq")
    assert unlabelled(browser.driver) == []
    page.fill(inputs)
    page.max_tokens(16)
    page.send()
    return page.wait_answer()


def test_mcq_form_shows_the_parsed_letter_the_server_returned(server, browser):
    # SmolLM2 answers this one "C. Kidney" at temperature 0: wrong, and clearly one option, which is what the page
    # must show as such (whether it is right is not the page's to say)
    inputs = {"question": "Which organ produces insulin?",
              "options": {"A": "Liver", "B": "Pancreas", "C": "Kidney", "D": "Heart"}}
    answer = _ask_mcq(server, browser, inputs)
    letter = answer.find_element("css selector", ".choice-letter").text
    direct = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "template": "mcq", "template_inputs": inputs, "max_tokens": 16}).json()
    assert direct["edgemed"]["parsed"]["ok"], direct
    assert letter == direct["edgemed"]["parsed"]["value"]
    assert inputs["options"][letter] in answer.text
    raw = answer.find_element("css selector", "details.raw")
    assert raw.get_attribute("open") is None  # the raw text one click away
    raw.find_element("css selector", "summary").click()
    assert raw.find_element("css selector", ".raw-text").text.strip() == direct["choices"][0]["message"]["content"].strip()


def test_mcq_form_shows_no_letter_for_a_reply_that_names_two_options(server, browser):
    """SmolLM2 answers this one "C. Vitamin B12" (C's letter, B's text): the server reads no answer from it, and the
    page must say so rather than show a letter (it once read C)."""
    inputs = {"question": "Which vitamin deficiency causes scurvy?",
              "options": {"A": "Vitamin C", "B": "Vitamin B12", "C": "Vitamin A", "D": "Vitamin D"}}
    answer = _ask_mcq(server, browser, inputs)
    assert not answer.find_elements("css selector", ".choice-letter")
    assert "did not follow the form's format" in answer.text
    assert answer.get_attribute("data-done") == "not in the form's format"  # it was "done", and "Answered."
    assert "Answered" not in browser.driver.find_element("css selector", "#status").text


def test_no_field_a_clinician_types_in_is_spell_checked(server, browser):
    page = browser.page(server.url)
    modes = [o.get_attribute("value") for o in page.all("#mode option")]
    assert "" in modes and "mcq" in modes and "note_summary" in modes
    for mode in modes:
        page.choose(mode)
        fields = browser.driver.execute_script(
            "return document.querySelectorAll('#ask textarea, #ask input[type=text]').length")
        assert fields >= 1, mode
        assert spellchecked(browser.driver) == [], f"{mode or 'chat'}: spell-checked fields"


def test_stop_ends_a_long_answer_and_frees_the_slot(server, browser):
    page = browser.page(server.url)
    page.max_tokens(700)
    page.ask("Write a long, detailed essay on the history of medicine, century by century.")
    page.wait(lambda: len(page.find("#log .answer-text").text) > 40, 60, "some of the answer")
    page.find("#stop").click()
    answer = page.wait_answer(10)
    assert answer.get_attribute("data-done") == "stopped"
    shown = answer.find_element("css selector", ".answer-text").text
    assert wait_until(lambda: httpx.get(server.url + "/health").json()["active_slots"] == 0, 10)
    time.sleep(0.5)
    assert answer.find_element("css selector", ".answer-text").text == shown  # nothing more arrived
    assert len(shown.split()) < 600
    assert page.find("#send").is_enabled() and not page.find("#stop").is_enabled()
    request_id = answer.find_element("css selector", ".request-id").text
    assert wait_until(lambda: any(r.get("request_id") == request_id and r["outcome"] == "client_disconnected"
                                  for r in audit_records(server.audit_path)), 10)


def test_a_new_conversation_mid_answer_keeps_nothing_of_the_last_one(server, browser):
    """New conversation while an answer streams: the stopped request's question and partial answer used to land in
    the emptied transcript once the request settled, so the next patient's saved conversation began with them."""
    page = browser.page(server.url)
    page.max_tokens(700)
    page.ask("Patient A, 54, chest pain since this morning: write a long, detailed differential diagnosis.")
    page.wait(lambda: len(page.find("#log .answer-text").text) > 40, 60, "some of the answer")
    page.find("#new-chat").click()
    assert wait_until(lambda: httpx.get(server.url + "/health").json()["active_slots"] == 0, 10)
    time.sleep(0.5)  # the stopped request's own end has run in the page
    assert not page.all("#log .turn") and page.find("#status").text == "New conversation."
    page.find("#export").click()
    assert page.find("#status").text == "Nothing to save yet."


def test_think_block_is_folded_away_from_the_answer(server, browser, smollm_system):
    page = browser.page(server.url)
    page.max_tokens(12)
    page.ask("Write the XML tags <think>scratch</think> then the answer yes")  # SmolLM2 (greedy) writes them first
    answer = page.wait_answer()
    think = answer.find_element("css selector", "details.think")
    assert think.is_displayed() and think.get_attribute("open") is None  # there, and folded
    assert think.get_attribute("textContent").endswith("scratch")
    text = answer.find_element("css selector", ".answer-text").text
    assert text.strip() and "<think>" not in text and "</think>" not in text and not text.startswith("scratch")


#: Feeds pieces of a streamed answer to the page's own splitter (ui/think.js) and returns [reasoning, answer].
SPLIT = """
const [opened, pieces] = arguments, got = ["", ""];
const split = window.EdgemedThink.splitter(opened), out = (inThink, text) => { got[inThink ? 0 : 1] += text; };
for (const piece of pieces) split.feed(piece, out);
split.flush(out);
return got;
"""


@pytest.mark.parametrize("opened,pieces,reasoning,answer", [
    # a </think> in the middle of an answer is the answer's text: folding everything before it hid a warning
    (False, ["Dose 5 mg. WARNING: contraindicated in renal failure.", "</think>", "Dose 5 mg."], "",
     "Dose 5 mg. WARNING: contraindicated in renal failure.</think>Dose 5 mg."),
    # the template opened the block (the response's header): reasoning up to </think>, cut anywhere
    (True, ["weigh A against B", "</thi", "nk>", "\n\nAnswer: B"], "weigh A against B", "\n\nAnswer: B"),
    # a block the model opens first thing is reasoning; one after the answer began is text
    (False, ["\n<thi", "nk>plan</think>", "Yes <think>x</think>"], "plan", "\nYes <think>x</think>"),
    (False, ["<", "think", ">", "never closed"], "never closed", ""),
])
def test_only_a_reasoning_block_before_the_answer_is_folded(server, browser, opened, pieces, reasoning, answer):
    page = browser.page(server.url)
    assert page.driver.execute_script(SPLIT, opened, pieces) == [reasoning, answer]


@pytest.fixture(scope="module")
def opening_server(smollm2_gguf, tmp_path_factory):
    """SmolLM2 with a chat template that opens the reasoning block itself, as R1-Distill's does."""
    from test_template_limits import with_chat_template

    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "<|im_start|>assistant\n<think>\n")
    tmp = tmp_path_factory.mktemp("opening")
    path = with_chat_template(smollm2_gguf, tmp / "opening.gguf", template)
    with page_server(path, tmp / "audit.jsonl", default_max_tokens=8) as srv:
        yield srv


def test_a_block_the_template_opened_is_folded_and_an_answer_cut_inside_it_says_so(opening_server, browser):
    r = httpx.post(opening_server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-edgemed-think"] == "open"
    page = browser.page(opening_server.url)
    page.ask("What is the first-line treatment for anaphylaxis?")
    answer = page.wait_answer()
    think = answer.find_element("css selector", "details.think")
    assert think.get_attribute("textContent").strip() and not answer.find_element("css selector", ".answer-text").text
    assert answer.get_attribute("data-done").startswith("no answer: the reasoning reached the answer length limit")
    browser.forget(opening_server.url)  # the origin check below is about the module's own server


def test_hostile_input_and_output_are_text_never_html(server, browser, smollm_system):
    page = browser.page(server.url)
    page.choose("mcq")
    page.fill({"question": HOSTILE, "options": {"A": HOSTILE, "B": "<b>bold</b>", "C": "x", "D": "y"}})
    page.max_tokens(2)  # the inputs are what this part is about
    page.send()
    page.wait_answer()
    page.choose("")
    page.max_tokens(36)
    page.ask(HOSTILE_ASK)
    answer = page.wait_answer()
    log = page.find("#log").text
    assert log.count(HOSTILE) >= 2 and "<b>bold</b>" in log  # the inputs, shown as typed
    output = answer.find_element("css selector", ".answer-text").text
    assert 'onerror="window.__pwned=1"' in output and "<img" in output  # the model wrote HTML ...
    driver = browser.driver
    assert driver.execute_script("return window.__pwned") is None  # ... and none of it ran
    assert driver.execute_script("return document.querySelectorAll('#log img, #log script, #log b').length") == 0
    assert outside(browser.requests(), server.url) == []


def test_back_after_leaving_the_page_does_not_bring_the_conversation_back(server, browser):
    """Another page opened in the same tab, then Back: the page loads afresh, with no conversation (no back/forward
    cache), as it would for the next person at a shared workstation."""
    page = browser.page(server.url)
    page.max_tokens(2)
    page.ask("Chest pain since this morning")
    page.wait_answer()
    driver = browser.driver
    driver.get(server.url + "/health")
    driver.back()
    Page(driver, server.url).ready()
    assert driver.execute_script("return document.getElementById('log').textContent") == ""
    assert driver.execute_script("return performance.getEntriesByType('navigation')[0].type") == "back_forward"


def test_a_page_on_another_origin_cannot_make_the_browser_use_the_model(server, browser):
    """A page elsewhere posts to the server in no-cors mode (text/plain: the browser asks nothing first); Chromium's
    own Origin and Sec-Fetch-Site headers get it refused before any generation."""
    import http.server
    import threading

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>elsewhere</title>")

        def log_message(self, *args):
            pass

    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    before = len(audit_records(server.audit_path))
    browser.requests()
    kept = list(browser.seen)  # the other origin's page is this test's, not the clinician page's
    try:
        browser.driver.get(f"http://localhost:{elsewhere.server_address[1]}/")  # another origin, and another site
        sent = browser.driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(arguments[0] + '/v1/chat/completions', {method: 'POST', mode: 'no-cors', body: arguments[1]})
              .then(() => done('sent'), (e) => done(String(e)));""",
            server.url, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}))
        assert sent == "sent"
        assert wait_until(lambda: len(audit_records(server.audit_path)) > before, 10)
    finally:
        elsewhere.shutdown()
        elsewhere.server_close()
        browser.requests()
        browser.seen = kept
    [record] = audit_records(server.audit_path)[before:]
    assert (record["endpoint"], record["status"], record["error_code"]) == ("chat", 403, "cross_origin_forbidden")


def test_every_request_stays_on_the_servers_origin(server, browser):
    page = browser.page(server.url)
    page.max_tokens(1)
    page.ask("Hello")
    page.wait_answer()
    page.choose("mcq")
    seen = browser.seen + browser.requests()
    paths = {url.split(server.url, 1)[-1] for url, _ in seen}
    assert {"/", "/ui/app.js", "/ui/app.css", "/ui/info", "/v1/models", "/v1/chat/completions"} <= paths, paths
    assert outside(seen, server.url) == []


def test_a_server_with_keys_refuses_without_one_and_works_with_one(smollm2_gguf, tmp_path, browser):
    from edgemed.serve.security import ApiKeys

    keys = ApiKeys.from_lines([f"clinic-ward-3 {KEY}"])
    with page_server(smollm2_gguf, tmp_path / "audit.jsonl", api_keys=keys, default_max_tokens=4) as srv:
        assert httpx.get(srv.url + "/").status_code == 200  # the page loads, to ask for the key
        assert httpx.get(srv.url + "/ui/info").status_code == 401
        assert httpx.post(srv.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 401
        page = browser.page(srv.url)
        assert page.find("#ask").get_attribute("hidden") and page.find("#card").get_attribute("hidden")
        assert browser.driver.switch_to.active_element.get_attribute("id") == "key" and unlabelled(browser.driver) == []
        page.find("#key").send_keys("wrong-key-" + "y" * 20 + "\n")
        page.wait(lambda: "refused" in page.find("#key-error").text, 10, "the refusal")
        assert page.find("#ask").get_attribute("hidden")
        page.find("#key").send_keys(KEY + "\n")
        page.wait(lambda: not page.find("#ask").get_attribute("hidden"), 10, "the page after the key")
        page.ask("Hello")
        answer = page.wait_answer()
        assert answer.get_attribute("data-done") in ("done", "cut at the answer length limit"), answer.text
        request_id = answer.find_element("css selector", ".request-id").text
        record = [r for r in audit_records(srv.audit_path) if r.get("request_id") == request_id]
        assert record and record[0]["key_id"] == "clinic-ward-3" and record[0]["status"] == 200
        assert stored(browser.driver) == {"local": [], "session": [], "indexeddb": []}


def test_an_answer_cut_by_the_room_left_in_the_context_says_so(smollm2_gguf, tmp_path, browser):
    """The server caps an answer to the room the prompt leaves in the context; the page tells that from the
    clinician's own answer length by the usage it asks for (prompt and answer tokens fill the context). The first
    question of a conversation is to be shortened: a new conversation (the advice it gave) fills the same way, and
    one longer than the context is refused the same way."""
    from edgemed.templates.library import safety_preamble

    room = 256
    with page_server(smollm2_gguf, tmp_path / "audit.jsonl", n_ctx=room) as srv:
        def question(n: int) -> str:
            return "Count on from 1 to 500, one number a line: " + "1, 2, 3, " * n

        def sent(n: int) -> list[dict]:  # as the page sends it: the safety preamble first
            return [{"role": "system", "content": safety_preamble()}, {"role": "user", "content": question(n)}]

        def tokens(n: int) -> int:
            return len(srv.batcher.tokenize(srv.batcher.render_chat(sent(n), None)))

        n = 0
        while tokens(n + 1) <= room - 6:  # a question that leaves a few tokens of room
            n += 1
        page = browser.page(srv.url)
        page.max_tokens(500)
        page.ask(question(n))
        answer = page.wait_answer()
        assert answer.get_attribute("data-done") == "cut off: the question filled the model's context", answer.text
        status = page.find("#status").text
        assert "Shorten it, and send again" in status and "New conversation" not in status + answer.text
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": sent(n), "max_tokens": 500})
        used = r.json()["usage"]  # what the page read: the context filled, below the 500 tokens asked for
        assert used["prompt_tokens"] + used["completion_tokens"] == room and used["completion_tokens"] < 500

        page.find("#new-chat").click()
        assert tokens(2 * n) > room  # a first question the context cannot take at all
        page.ask(question(2 * n))
        answer = page.wait_answer()
        assert "This question is too long for the model: shorten it, and send again." in answer.text
        assert "New conversation" not in answer.text + page.find("#status").text
        browser.forget(srv.url)


def test_a_form_answer_cut_at_the_answer_length_names_the_limit_not_the_cli(server, browser):
    """An MCQ answer cut at 4 tokens (SmolLM2 writes "C. Vitamin B12" here): the page said it was not in the form's
    format ("ask again", which cuts it the same way) and showed the server's fix for the CLI, "raise max_tokens
    (--max-tokens)"."""
    page = browser.page(server.url)
    page.choose("mcq")
    page.fill({"question": "Which vitamin deficiency causes scurvy?",
               "options": {"A": "Vitamin C", "B": "Vitamin B12", "C": "Vitamin A", "D": "Vitamin D"}})
    page.max_tokens(4)
    page.send()
    answer = page.wait_answer()
    assert answer.get_attribute("data-done") == "cut at the answer length limit: raise the answer length and send " \
                                                "again", answer.text
    assert "answer length" in page.find("#status").text and not answer.find_elements("css selector", ".choice-letter")
    assert "--max-tokens" not in browser.driver.execute_script("return document.body.textContent")


def test_readable_at_200_percent_zoom(server, browser):
    """200 % zoom halves the CSS width: at 550 px the page and the widest form reflow, with no sideways scrolling."""
    driver = browser.driver
    size = driver.get_window_size()
    driver.set_window_size(550, 900)
    try:
        page = browser.page(server.url)
        for mode in ("", "mcq", "triage", "patient_education"):
            page.choose(mode)
            assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), mode
            assert page.find("#send").is_displayed()
    finally:
        driver.set_window_size(size["width"], size["height"])
