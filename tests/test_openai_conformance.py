"""OpenAI conformance: the official ``openai`` client against a real ``edgemed serve`` (uvicorn, the real batcher)
on SmolLM2 and, for what SmolLM2's template cannot show (tool calls), the pip Qwen2.5-0.5B.

What each case proves:
- models: ``models.retrieve`` answers the served id and 404s another;
- max_tokens: a cap beyond the room left ends with ``length`` inside the context; a prompt alone too long is a
  400 ``context_length_exceeded``;
- errors: ``param`` names the offending field (edgemed's own ``grammar`` too, when llama.cpp's parser could not take it
  safely, and ``template_inputs``, whose fix says to send the input there), malformed JSON names none, an image part says images are not supported by this model; tools on a
  template without a tool format is a 400 naming the model;
- grammar errors: an answer its grammar stopped (no token allowed, one token too costly) and a grammar the probe
  refuses name, whole and streamed, the field the grammar came from in ``param`` and in the fix (``grammar``,
  ``response_format``, a forced function's ``tools.N.function.parameters`` or ``tools``, a template's ``template``);
- logprobs: chat ``top_logprobs`` of the first answer token and completions ``echo`` prompt log probabilities agree
  within 1e-4 with a log-softmax of the same model's logits computed directly through ``runtime/logits.py``; later
  answer tokens' agree within 1e-4 with rows computed one decode step at a time, as the sampler's were;
- logit_bias: a token banned with -100 never appears in three sampled choices, though greedy picks it unbanned;
- penalties: frequency/presence penalties change a greedy answer that repeats;
- n: three choices at temperature 0.8 from one prefill (the batcher's computed prompt tokens grow by one prompt,
  two sequences are counted as forked) with the prompt counted once in usage; a list of prompts gives n each;
- tools (Qwen2.5): forced, required, auto (streamed, as OpenAI streams deltas) and in a history come back as
  ``tool_calls`` whose arguments parse as JSON and validate against the function's schema; the parser reads
  tagged, bare and fenced calls to known functions only, and the stream filter never lets a call's text out;
- tools (SmolLM2 with a Hermes-format chat template swapped in): a streamed call goes through the SDK's own
  ``.stream()`` helper (later deltas carry no ``"type": null``), and a schema that cannot become a grammar names
  its field; an answer cut at max_tokens ends with ``length`` and carries no call, whole or streamed;
- completions logprobs on text whose characters span tokens (an emoji, Japanese): each ``text_offset`` is where the
  token's text starts, the character a token completes is that token's, and tokens of part of a character are
  named by their bytes (``bytes:\\xf0\\x9f``), as OpenAI names them;
- completions echo on a tokenizer that adds a BOS (SmolLM2 with ``add_bos_token`` set): the echoed text is the prompt
  as sent, the BOS is listed first (``usage.prompt_tokens`` counts it) with an empty span at offset 0, and the other
  tokens' offsets index that text, whole and streamed; a BOS the client sent as a token id is its text's;
- Retry-After and the 429's message name the same whole seconds.
"""

from __future__ import annotations

import functools
import json
import re
import shutil

import pytest

from serve_kit import ServerThread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")
jsonschema = pytest.importorskip("jsonschema")

from edgemed.runtime.batch import batcher as batcher_module  # noqa: E402
from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from edgemed.runtime.batch.options import log_softmax  # noqa: E402
from edgemed.runtime.engine import LoadSettings  # noqa: E402
from edgemed.serve.app import create_app  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402

SMOL = "smollm2-test"
QWEN = "qwen-test"
N_CTX = 256  # per slot
TOLERANCE = 1e-4


def _server(path, model_id: str, slots: int, n_ctx: int = N_CTX):
    batcher = Batcher(path, LoadSettings(n_ctx=n_ctx * slots, n_threads=1), slots=slots, queue_size=4)
    batcher.start()
    app = create_app(batcher, ServeConfig(model_id=model_id, bundle_digest="sha256:test"))
    srv = ServerThread(app).__enter__()
    srv.batcher, srv.path = batcher, path
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    return srv


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    srv = _server(smollm2_gguf, SMOL, slots=4)
    try:
        yield srv
    finally:
        srv.__exit__(None, None, None)
        srv.batcher.close()


@pytest.fixture(scope="module")
def logits_run(smol):
    """The same GGUF loaded through the project's one logits function (``runtime/logits.py``)."""
    from edgemed.runtime.logits import SequenceLogits

    with SequenceLogits(smol.path, N_CTX, threads=1) as run:
        yield run


@pytest.fixture(scope="module")
def reference(logits_run):
    """The same GGUF's logits of a whole sequence computed directly, log-softmaxed per row."""
    return lambda tokens: [log_softmax(row) for row in logits_run(tokens)]


def metric(srv, name: str) -> float:
    text = httpx.get(srv.url + "/metrics").text
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def chat_tokens(srv, messages) -> list[int]:
    return srv.batcher.tokenize(srv.batcher.render_chat(messages))


# -- models, max_tokens, errors -----------------------------------------------------------------------------------
def test_models_retrieve_answers_the_served_id_and_404s_another(smol):
    card = smol.client.models.retrieve(SMOL)
    assert card.id == SMOL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        smol.client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and SMOL in e.value.message


def test_max_tokens_beyond_the_room_left_is_capped_with_length(smol):
    prompt = "note " * 240
    n_prompt = len(smol.batcher.tokenize(prompt))
    eos = smol.batcher.tokenize("<|im_end|>", add_special=False)
    bias = {str(t): -100 for t in eos} | {"0": -100}  # never stops early: it runs into the end of the slot
    out = smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=4096, logit_bias=bias)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == N_CTX - n_prompt
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.completions.create(model=SMOL, prompt="note " * 300, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"


def test_errors_name_the_offending_field(smol):
    c, msg = smol.client, [{"role": "user", "content": "hi"}]
    for kwargs, param in [({"temperature": 5}, "temperature"), ({"top_logprobs": 99, "logprobs": True}, "top_logprobs"),
                          ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"n": 9}, "n"),
                          ({"presence_penalty": 3}, "presence_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=SMOL, messages=msg, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=SMOL, prompt="x", max_tokens=2, suffix="y")
    assert e.value.body["param"] == "suffix"
    r = httpx.post(smol.url + "/v1/chat/completions", content=b'{"model": 1,', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None and r.json()["error"]["code"] == "invalid_json"
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": image}])
    assert "Images are not supported by this model" in e.value.message and e.value.body["param"] == "messages.0.content.1"


@pytest.mark.parametrize("inputs, says", [({"options": {"A": "a", "B": "b"}}, "needs the input 'question'"),
                                          ({"question": "q", "options": {"A": "a"}}, "needs at least 2 options")])
def test_a_templates_input_error_tells_the_client_to_send_template_inputs(smol, inputs, says):
    """The fix said "pass it with --question or --input question=...": the CLI's options, which no API client has."""
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.chat.completions.create(model=SMOL, messages=[], max_tokens=2,
                                            extra_body={"template": "mcq", "template_inputs": inputs})
    body = e.value.body
    assert says in body["message"] and "Fix: " in body["message"] and body["code"] == "invalid_template", body
    fix = body["message"].split("Fix: ", 1)[1]
    assert "'template_inputs'" in fix and "--" not in fix and body["param"] == "template_inputs", body


@pytest.mark.parametrize("grammar, words", [('root ::= "a"{2,1}', "at most 1 is fewer than at least 2"),
                                            ("root ::= " + '("a" ' * 1100 + ")" * 1100, "nests groups more than")])
def test_a_grammar_llama_cpp_cannot_parse_safely_names_the_grammar_field(smol, grammar, words):
    """edgemed's own ``grammar`` field, refused by ``check_gbnf``, was a 400 with ``param: null``."""
    c, msg = smol.client, [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=SMOL, messages=msg, max_tokens=2, extra_body={"grammar": grammar})
    assert e.value.body["param"] == "grammar" and words in e.value.message, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=SMOL, prompt="x", max_tokens=2, extra_body={"grammar": grammar})
    assert e.value.body["param"] == "grammar" and words in e.value.message, e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # through a medical template too
        inputs = {"question": "q", "options": {"A": "a", "B": "b"}}
        c.chat.completions.create(model=SMOL, messages=[], max_tokens=2,
                                  extra_body={"grammar": grammar, "template": "mcq", "template_inputs": inputs})
    assert e.value.body["param"] == "grammar" and words in e.value.message, e.value.body
    for kind in ({"image": 1}, ["image_url"], 7):  # a part's type that is not a string: a 400, not a server error
        r = httpx.post(smol.url + "/v1/chat/completions", json={
            "model": SMOL, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": kind, "text": "hi"}]}]})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text[:300]


#: a character class no character is in: nothing may follow, so no token is allowed there
NOTHING = "[^\\x00-\\U0010FFFF]"
CONTINUE = "root ::= " + NOTHING
NO_STRING = {"type": "string", "pattern": f"^{NOTHING}$"}


def create(srv, endpoint: str, **kwargs):
    """The SDK's create of ``endpoint`` with a small request, the rest of it from ``kwargs``."""
    if endpoint == "chat":
        return functools.partial(srv.client.chat.completions.create, model=SMOL,
                                 messages=[{"role": "user", "content": "hi"}], **kwargs)
    return functools.partial(srv.client.completions.create, model=SMOL, prompt="x", **kwargs)


def stopped(create, **kwargs) -> list:
    """The errors of a request its grammar stopped: whole (a 400), then streamed (an ``error`` event)."""
    errors = []
    for stream in (False, True):
        with pytest.raises(openai.APIError) as e:
            out = create(stream=stream, **kwargs)
            if stream:
                list(out)
        errors.append(e.value)
    return errors


def fix_of(error) -> str:
    assert "Fix: " in error.message, error.message
    return error.message.split("Fix: ", 1)[1]


@pytest.mark.parametrize("endpoint, extra, param", [
    ("chat", {"extra_body": {"grammar": 'root ::= "yes" | "no"'}}, "grammar"),
    ("completions", {"extra_body": {"grammar": 'root ::= "yes" | "no"'}}, "grammar"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_an_answer_its_grammar_made_too_costly_names_the_field_the_grammar_came_from(smol, monkeypatch, endpoint,
                                                                                    extra, param):
    """``grammar_too_costly`` came with ``param: null``, whole and streamed: the client was not told which field."""
    monkeypatch.setattr(batcher_module, "GRAMMAR_TOKEN_S", 0.0)  # every grammar's first token is too costly now
    for error in stopped(create(smol, endpoint, max_tokens=4), **extra):
        assert (error.code, error.param) == ("grammar_too_costly", param), error.body
        assert f"'{param}'" in fix_of(error) and "repetition" in fix_of(error), error.message


@pytest.mark.parametrize("endpoint, extra, param", [
    ("chat", {"extra_body": {"grammar": CONTINUE}}, "grammar"),
    ("completions", {"extra_body": {"grammar": CONTINUE}}, "grammar"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": NO_STRING}}},
     "response_format"),
])
def test_an_answer_its_grammar_left_no_token_names_the_field_the_grammar_came_from(smol, endpoint, extra, param):
    """``no_token_allowed`` came with ``param: null``; the fix speaks of logit_bias only when the request bans tokens."""
    for error in stopped(create(smol, endpoint, max_tokens=4), **extra):
        assert (error.code, error.param) == ("no_token_allowed", param), error.body
        assert "loosen the " in fix_of(error) and f"'{param}'" in fix_of(error), error.message
        assert "logit_bias" not in fix_of(error), error.message
    for error in stopped(create(smol, endpoint, max_tokens=4, logit_bias={"0": -100}), **extra):
        assert error.param == param and "remove the -100 logit_bias" in fix_of(error), error.message


def test_a_grammar_the_probe_refuses_names_the_grammar_field_and_keeps_the_parsers_fix(smol):
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.completions.create(model=SMOL, prompt="x", max_tokens=2, extra_body={"grammar": "root ::= ("})
    assert e.value.param == "grammar" and "does not parse" in e.value.message, e.value.body
    assert fix_of(e.value).startswith("correct the grammar in 'grammar' (check the GBNF syntax"), e.value.message


def test_sampler_values_no_sampler_means_are_refused(smol):
    msg = [{"role": "user", "content": "hi"}]
    for extra, param in [({"repeat_penalty": 11}, "repeat_penalty"), ({"top_k": 2**31}, "top_k")]:
        with pytest.raises(openai.BadRequestError) as e:
            smol.client.chat.completions.create(model=SMOL, messages=msg, max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param, (extra, e.value.body)
    for raw in (b"Infinity", b"NaN"):  # Python's JSON reader takes both; neither is a penalty
        r = httpx.post(smol.url + "/v1/chat/completions", headers={"content-type": "application/json"},
                       content=b'{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], '
                               b'"repeat_penalty": %s}' % (SMOL.encode(), raw))
        assert r.status_code == 400 and r.json()["error"]["param"] == "repeat_penalty", r.text


def test_prompts_times_choices_beyond_slots_and_queue_are_a_400_not_a_429_for_ever(smol):
    room = smol.batcher.slots + smol.batcher.queue_size
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.completions.create(model=SMOL, prompt=["a"] * 8, n=2, max_tokens=1)
    assert e.value.body["param"] == "prompt" and f"at most {room}" in e.value.message and 16 > room
    out = smol.client.completions.create(model=SMOL, prompt=["a"] * 4, n=2, max_tokens=1)  # 8 fit
    assert len(out.choices) == 8


def test_without_a_seed_each_request_draws_its_own(smol):
    msg = [{"role": "user", "content": "Write one sentence about the heart."}]

    def ask(**kw):
        return smol.client.chat.completions.create(model=SMOL, messages=msg, temperature=1.5, max_tokens=16,
                                                   **kw).choices[0].message.content

    assert len({ask() for _ in range(3)}) >= 2  # seed 0 for all made these one answer three times
    assert ask(seed=7) == ask(seed=7)


def test_tools_on_a_template_without_a_tool_format_is_a_400_naming_the_model(smol):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert SMOL in e.value.message and "tool" in e.value.message and e.value.body["param"] == "tools"
    history = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "{}"}]
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.chat.completions.create(model=SMOL, messages=history)
    assert SMOL in e.value.message


# -- log probabilities ----------------------------------------------------------------------------------------------
def test_chat_top_logprobs_agree_with_the_models_own_logits(smol, reference):
    messages = [{"role": "user", "content": "What organ pumps blood?"}]
    out = smol.client.chat.completions.create(model=SMOL, messages=messages, max_tokens=6, logprobs=True,
                                              top_logprobs=5)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens and "".join(e.token for e in entries) == \
        out.choices[0].message.content
    tokens = chat_tokens(smol, messages)
    lp = reference(tokens)[-1]  # the first answer token's distribution: the prompt's last row
    first = entries[0]
    assert len(first.top_logprobs) == 5 and first.top_logprobs[0].token == first.token  # greedy picks the top one
    want = sorted(lp, reverse=True)[:5]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(want, abs=TOLERANCE)
    ids = smol.batcher.tokenize(first.token, add_special=False)
    assert first.logprob == pytest.approx(lp[ids[0]], abs=TOLERANCE) and bytes(first.bytes).decode() == first.token


def test_later_answer_tokens_are_the_rows_the_sampler_read(smol, logits_run):
    """From the second answer token on, a token's entry is the row of the decode step that fed the token before it
    alone (the row the sampler read), not the row whole-sequence rescoring computes in a batch with the others:
    docs/openai.md gives how far those two are apart (benchmarks/served_logprobs.py)."""
    messages = [{"role": "user", "content": "Name two first-line treatments for anaphylaxis."}]
    out = smol.client.chat.completions.create(model=SMOL, messages=messages, max_tokens=12, logprobs=True,
                                              top_logprobs=3)
    entries = out.choices[0].logprobs.content
    ids = [smol.batcher.tokenize(e.token, add_special=False) for e in entries]
    assert len(entries) == 12 and all(len(i) == 1 for i in ids), [e.token for e in entries]
    prompt, ctx = chat_tokens(smol, messages), logits_run.ctx
    ctx.clear()
    rows = [ctx.eval(prompt, 0)[-1]] + [ctx.eval(t, len(prompt) + i)[-1] for i, t in enumerate(ids[:-1])]
    for e, (token,), row in zip(entries, ids, rows):
        lp = log_softmax(row)
        assert e.logprob == pytest.approx(lp[token], abs=TOLERANCE), e.token
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(sorted(lp, reverse=True)[:3], abs=TOLERANCE)


def test_completion_echo_gives_every_prompt_tokens_logprob(smol, reference):
    prompt = "The heart has four chambers"
    out = smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=3, logprobs=2, echo=True)
    choice = out.choices[0]
    tokens = smol.batcher.tokenize(prompt)
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(tokens) + out.usage.completion_tokens and "".join(lp.tokens) == choice.text
    rows = reference(tokens)
    want = [rows[i - 1][tokens[i]] for i in range(1, len(tokens))]
    assert lp.token_logprobs[1:len(tokens)] == pytest.approx(want, abs=TOLERANCE)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:]) and lp.text_offset[0] == 0
    # echo skips prefix reuse: the same prompt again (now held by a slot) gives the same numbers
    again = smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=3, logprobs=2, echo=True)
    assert again.choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_streamed_logprobs_cover_the_streamed_text(smol):
    chunks = list(smol.client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Name a vitamin."}], max_tokens=8, logprobs=True,
        top_logprobs=1, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert text and "".join(e.token for e in entries) == text


# -- sampling controls ----------------------------------------------------------------------------------------------
def test_a_token_banned_by_logit_bias_never_appears(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = smol.client.chat.completions.create(model=SMOL, messages=messages, max_tokens=4, logprobs=True)
    favourite = greedy.choices[0].logprobs.content[0]
    banned = smol.batcher.tokenize(favourite.token, add_special=False)
    assert len(banned) == 1
    out = smol.client.chat.completions.create(model=SMOL, messages=messages, max_tokens=24, temperature=1.0, n=3,
                                              seed=5, logprobs=True, logit_bias={str(banned[0]): -100})
    assert len(out.choices) == 3
    for choice in out.choices:
        assert all(e.bytes != favourite.bytes for e in choice.logprobs.content), choice.message.content


def test_frequency_and_presence_penalties_change_a_repeating_answer(smol):
    prompt = "List: apple, apple, apple, apple, apple,"
    plain = smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=16).choices[0].text
    freq = smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=16, frequency_penalty=2.0)
    pres = smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=16, presence_penalty=2.0)
    assert plain.count("apple") > freq.choices[0].text.count("apple")
    assert pres.choices[0].text != plain


def test_n_choices_come_from_one_prefill(smol):
    messages = [{"role": "user", "content": "Write one sentence about the kidneys."}]
    computed, forked = metric(smol, "edgemed_batcher_prompt_tokens"), metric(smol, "edgemed_batcher_forked_sequences")
    finished_prompts = metric(smol, "edgemed_prompt_tokens")
    out = smol.client.chat.completions.create(model=SMOL, messages=messages, n=3, temperature=0.8, max_tokens=16)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) >= 2  # sampled apart, seed + choice
    n_prompt = len(chat_tokens(smol, messages))
    assert out.usage.prompt_tokens == n_prompt  # the prompt counts once
    fed = n_prompt - out.usage.prompt_tokens_details.cached_tokens
    assert metric(smol, "edgemed_batcher_prompt_tokens") - computed == fed  # one prefill, not three
    assert metric(smol, "edgemed_batcher_forked_sequences") - forked == 2
    assert metric(smol, "edgemed_prompt_tokens") - finished_prompts == n_prompt  # per request, as usage counts it
    chunks = list(smol.client.chat.completions.create(model=SMOL, messages=messages, n=2, temperature=0.8,
                                                      max_tokens=6, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 2


def test_a_list_of_prompts_gives_n_choices_each(smol):
    prompts = ["The lungs", "The liver"]
    out = smol.client.completions.create(model=SMOL, prompt=prompts, max_tokens=4, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    single = [smol.client.completions.create(model=SMOL, prompt=p, max_tokens=4).choices[0].text for p in prompts]
    assert [out.choices[0].text, out.choices[2].text] == single  # greedy: choice i answers prompt i // n
    assert out.usage.prompt_tokens == sum(len(smol.batcher.tokenize(p)) for p in prompts)


# -- tools (Qwen2.5's template carries the <tool_call> format) ----------------------------------------------------
DOSE = {"type": "function", "function": {
    "name": "dose_calculator", "description": "Compute a drug dose in mg from the patient's weight.",
    "parameters": {"type": "object", "properties": {"drug": {"type": "string"}, "weight_kg": {"type": "number"}},
                   "required": ["drug", "weight_kg"]}}}
FORMULARY = {"type": "function", "function": {
    "name": "formulary_lookup", "description": "Look up a drug in the hospital formulary.",
    "parameters": {"type": "object", "properties": {"drug": {"type": "string"}}, "required": ["drug"]}}}
TOOLS = [DOSE, FORMULARY]
ASK = [{"role": "user", "content": "What paracetamol dose for a 20 kg child? Use the dose calculator."}]


@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    srv = _server(qwen_gguf, QWEN, slots=2, n_ctx=768)  # the tools' descriptions take ~300 tokens
    try:
        yield srv
    finally:
        srv.__exit__(None, None, None)
        srv.batcher.close()


@pytest.fixture(scope="session")
def qwen_gguf():
    from edgemed.converters.source import pip_models
    from edgemed.errors import InputError

    try:
        return pip_models.gguf_file("qwen2.5-0.5b-instruct")
    except InputError as exc:
        pytest.skip(f"real model 'qwen2.5-0.5b-instruct' not installed: {exc.fix}")


def valid_calls(calls, tools=TOOLS) -> list[dict]:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls, "no tool calls"
    out = []
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in schemas
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, schemas[call.function.name])
        out.append(args)
    return out


def test_a_forced_tool_call_matches_its_schema(qwen):
    named = {"type": "function", "function": {"name": "formulary_lookup"}}
    out = qwen.client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=40)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == \
        ["formulary_lookup"]
    valid_calls(choice.message.tool_calls)
    out = qwen.client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=40)
    assert len(out.choices[0].message.tool_calls) == 1 and valid_calls(out.choices[0].message.tool_calls)


def test_an_auto_tool_call_streams_as_openai_deltas(qwen):
    chunks = list(qwen.client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, max_tokens=48,
                                                      stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] = call["name"] or (delta.function.name if delta.function else None)
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert calls and all(c["id"] and c["name"] == "dose_calculator" for c in calls.values())
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), DOSE["function"]["parameters"])


def test_tool_calls_and_results_in_a_history_render_and_answer(qwen):
    args = {"drug": "paracetamol", "weight_kg": 20}
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "dose_calculator", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"dose_mg": 300})}]
    from edgemed.serve.api import ChatMessage

    rendered = qwen.batcher.render_chat([ChatMessage(**m).as_template_message() for m in history],
                                        [DOSE, FORMULARY])
    assert '"arguments": {"drug": "paracetamol", "weight_kg": 20}' in rendered and "<tool_response>" in rendered
    out = qwen.client.chat.completions.create(model=QWEN, messages=history, tools=TOOLS, max_tokens=24)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.message.tool_calls:
        valid_calls(choice.message.tool_calls)
    else:
        assert choice.message.content
    none = qwen.client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, tool_choice="none",
                                               max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


# -- the tool-call parser and stream filter on their own (no model) ---------------------------------------------
def test_calls_are_read_tagged_bare_or_fenced_and_only_for_known_functions():
    from edgemed.serve.tools import parse

    tagged = parse('Checking.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', {"f"})
    assert tagged.content == "Checking." and json.loads(tagged.calls[0]["function"]["arguments"]) == {"a": 1}
    fenced = parse('```json\n{"name": "f", "arguments": {"a": 2}}\n```', {"f"})
    assert fenced.content is None and fenced.calls[0]["function"]["name"] == "f"
    assert parse('{"name": "g", "arguments": {}}', {"f"}).calls == []  # not one of the tools: plain content
    assert parse('{"answer": 3}', {"f"}).content == '{"answer": 3}'
    broken = parse("<tool_call>\n{not json}\n</tool_call>", {"f"})
    assert broken.calls == [] and "not json" in broken.content


def test_the_stream_filter_holds_a_call_back_and_passes_text_on():
    from edgemed.serve.tools import CallFilter

    f = CallFilter({"f"})
    sent = [f.push(p) for p in ["Let me", " check <tool", '_call>\n{"name": "f", ', '"arguments": {}}\n</tool_call>']]
    assert "".join(sent) == "Let me check " and "<tool" not in "".join(sent)
    rest, calls = f.finish()
    assert rest == "" and [c["function"]["name"] for c in calls] == ["f"]
    f = CallFilter({"f"})
    assert [f.push(p) for p in ["{", "1 + 1}"]] == ["", ""]  # could have been a call: held to the end
    assert f.finish() == ("{1 + 1}", [])


# -- tool calls as shapes (no model): the SDK's accumulator, and an answer cut at max_tokens -------------------
CALL = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
HALF = '<tool_call>\n{"name": "f", "argum'  # a second call, cut at max_tokens while it was written


def shaped(pieces: list[str], reason: str) -> list[dict]:
    """Every chunk ``ChatShape`` streams for one answer that holds calls to ``f``, as the client reads them."""
    from edgemed.serve.endpoints import Answer, ChatShape
    from edgemed.serve.tools import CallFilter

    shape, answer = ChatShape(id="chatcmpl-t", model=SMOL), Answer(0, calls=CallFilter({"f"}))
    out = shape.head([answer])
    for piece in pieces:
        answer.parts.append(piece)
        out += shape.piece(answer, piece, [])
    out += shape.final(answer, reason)
    return [json.loads(json.dumps(c)) for c in out]  # through JSON, as on the wire


def whole(text: str, reason: str) -> dict:
    from edgemed.runtime.batch.stream import Finished
    from edgemed.serve.endpoints import Answer, ChatShape
    from edgemed.serve.tools import CallFilter

    done = Finished(reason, prompt_tokens=3, completion_tokens=9, ttft_s=0.1, total_s=0.2, queue_s=0.0)
    answer = Answer(0, parts=[text], calls=CallFilter({"f"}), finished=done)
    return ChatShape(id="chatcmpl-t", model=SMOL).whole([answer], [reason])["choices"][0]


def test_streamed_tool_call_deltas_accumulate_in_the_sdks_stream_state():
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    chunks = shaped(["Checking. ", CALL[:20], CALL[20:]], "stop")
    later = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")][1:]
    assert later == [{"index": 0, "function": {"arguments": '{"a": 1}'}}]  # as OpenAI sends them: no nulls
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and chunks[0]["choices"][0]["finish_reason"] is None
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.construct(**chunk))  # the SDK builds its chunks this way, unvalidated
    message = state.get_final_completion().choices[0].message
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "f" and json.loads(call.function.arguments) == {"a": 1}
    assert message.content == "Checking. "


def test_an_answer_cut_at_max_tokens_is_length_and_no_call():
    for reason, finish in (("length", "length"), ("stop", "tool_calls")):
        choice = whole("Checking.\n" + CALL + "\n" + HALF, reason)
        assert choice["finish_reason"] == finish, reason
    cut = whole("Checking.\n" + CALL + "\n" + HALF, "length")
    assert cut["message"]["tool_calls"] is None and cut["message"]["content"] == "Checking."  # the half call is no text
    assert whole(HALF, "length")["message"] == {"role": "assistant", "content": None, "refusal": None, "tool_calls": None}
    assert whole("A plain answer, cut", "length")["message"]["content"] == "A plain answer, cut"
    chunks = shaped(["Checking.\n", CALL, "\n" + HALF], "length")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and not any(d.get("tool_calls") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "Checking.\n"


def test_retry_after_and_the_message_say_the_same_seconds():
    from edgemed.errors import Overloaded
    from edgemed.serve.api import as_api_error

    for estimate, seconds in ((2.2, 3), (2.6, 3), (0.3, 1), (4.0, 4)):
        err = as_api_error(Overloaded(5, estimate))
        assert err.status == 429 and err.headers["Retry-After"] == str(seconds)
        assert f"retry in {seconds} s" in err.message, (estimate, err.message)


# -- tools on SmolLM2, with a Hermes-format chat template swapped in -------------------------------------------
HERMES = """{%- if tools %}<|im_start|>system
# Tools

You may call one or more functions to assist with the user query. The function signatures are within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
#: strict: the SDK's ``.stream()`` helper parses the arguments of strict functions only (and refuses others)
LOOKUP = {"type": "function", "function": {
    "name": "formulary_lookup", "description": "Look up a drug in the hospital formulary.", "strict": True,
    "parameters": {"type": "object", "properties": {"drug": {"type": "string", "maxLength": 24}}, "required": ["drug"],
                   "additionalProperties": False}}}
LOOKUP_ASK = [{"role": "user", "content": "Is paracetamol in the formulary? Look it up."}]


@pytest.fixture(scope="module")
def hermes(smollm2_gguf, tmp_path_factory):
    from test_template_limits import with_chat_template

    path = with_chat_template(smollm2_gguf, tmp_path_factory.mktemp("hermes") / "smollm2-hermes.gguf", HERMES)
    srv = _server(path, SMOL, slots=1, n_ctx=512)
    try:
        yield srv
    finally:
        srv.__exit__(None, None, None)
        srv.batcher.close()


def test_a_streamed_tool_call_goes_through_the_sdks_stream_helper(hermes):
    with hermes.client.chat.completions.stream(model=SMOL, messages=LOOKUP_ASK, tools=[LOOKUP], tool_choice="required",
                                               parallel_tool_calls=False, max_tokens=64) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and "tool_calls.function.arguments.done" in events
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "formulary_lookup" and call.id
    jsonschema.validate(call.function.parsed_arguments, LOOKUP["function"]["parameters"])


def test_a_schema_that_cannot_become_a_grammar_names_its_field(hermes):
    bad = {"type": "object", "properties": {"dose": {"type": "string", "pattern": "[0-9]+ mg"}}}  # no ^...$
    with pytest.raises(openai.BadRequestError) as e:
        hermes.client.chat.completions.create(model=SMOL, messages=LOOKUP_ASK, max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "dose", "schema": bad}})
    assert e.value.body["param"] == "response_format" and "cannot be turned into a grammar" in e.value.message
    tool = {"type": "function", "function": {"name": "dose_calculator", "parameters": bad}}
    with pytest.raises(openai.BadRequestError) as e:
        hermes.client.chat.completions.create(model=SMOL, messages=LOOKUP_ASK, max_tokens=2, tools=[LOOKUP, tool],
                                              tool_choice="required")
    assert e.value.body["param"] == "tools.1.function.parameters" and "dose_calculator" in e.value.message


def test_a_forced_call_or_template_its_grammar_stopped_names_that_field(hermes, monkeypatch):
    """A forced call's grammar is made from the functions' ``parameters``: one named function's schema is the field
    to change (``tool_choice`` the way out), several are ``tools``; a JSON template's contract is ``template``."""
    dose = {"type": "function", "function": {"name": "dose_note", "parameters": {
        "type": "object", "properties": {"dose": NO_STRING}, "required": ["dose"]}}}
    call = functools.partial(hermes.client.chat.completions.create, model=SMOL, messages=LOOKUP_ASK,
                             tools=[LOOKUP, dose], max_tokens=48)
    for error in stopped(call, tool_choice={"type": "function", "function": {"name": "dose_note"}}):
        assert (error.code, error.param) == ("no_token_allowed", "tools.1.function.parameters"), error.body
        assert "'dose_note' in 'tools'" in fix_of(error) and "'tool_choice'" in fix_of(error), error.message
    monkeypatch.setattr(batcher_module, "GRAMMAR_TOKEN_S", 0.0)  # every grammar's first token is too costly now
    for error in stopped(call, tool_choice="required"):
        assert (error.code, error.param) == ("grammar_too_costly", "tools"), error.body
    triage = functools.partial(hermes.client.chat.completions.create, model=SMOL, messages=[], max_tokens=4,
                               extra_body={"template": "triage", "template_inputs": {"case": "Chest pain."}})
    for error in stopped(triage):
        assert (error.code, error.param) == ("grammar_too_costly", "template"), error.body
        assert "the template 'triage'" in fix_of(error) and "'messages'" in fix_of(error), error.message


# -- completions logprobs where a character spans tokens ------------------------------------------------------
def token_bytes(token: str) -> bytes:
    """The bytes a completions ``tokens`` entry names: its text, or OpenAI's ``bytes:\\\\xNN`` form."""
    if not token.startswith("bytes:"):
        return token.encode()
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), token[6:].encode("latin-1"))


def check_offsets(text: str, lp) -> None:
    """Offsets never go back nor past the text, and the text from a token's offset to the next one's is what that
    token's bytes complete (nothing, for a token of part of a character)."""
    import codecs

    offsets = lp.text_offset + [len(text)]
    assert offsets == sorted(offsets) and offsets[-2] <= len(text), (offsets, len(text))
    decoder = codecs.getincrementaldecoder("utf-8")()
    for i, token in enumerate(lp.tokens):
        assert text[offsets[i]:offsets[i + 1]] == decoder.decode(token_bytes(token)), (i, token, lp.tokens)
    assert any(t.startswith("bytes:") for t in lp.tokens)  # the prompt's characters did span tokens


@pytest.mark.parametrize("prompt", ["Dose: 5 µg, heart 🫀 and lungs 🫁", "心臓は血液を送り出す"])
def test_completion_text_offsets_follow_characters_that_span_tokens(smol, prompt):
    out = smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=8, logprobs=1, echo=True)
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    check_offsets(choice.text, choice.logprobs)
    chunks = [c.choices[0] for c in smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=8, logprobs=1,
                                                                   echo=True, stream=True) if c.choices]
    text = "".join(c.text for c in chunks)
    streamed = type(choice.logprobs)(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for c in chunks:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(streamed, name).extend(getattr(c.logprobs, name) if c.logprobs else [])
    assert text == choice.text and streamed.text_offset == choice.logprobs.text_offset
    check_offsets(text, streamed)


def echoed(client, prompt, stream: bool):
    """A completion of ``prompt`` with ``echo`` and ``logprobs``: its text and legacy logprobs, whole or streamed."""
    out = client.completions.create(model=SMOL, prompt=prompt, max_tokens=4, logprobs=1, echo=True, stream=stream)
    if not stream:
        return out.choices[0].text, out.choices[0].logprobs
    chunks = [c.choices[0] for c in out if c.choices]
    lp = type(chunks[0].logprobs)(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for c in chunks:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(lp, name).extend(getattr(c.logprobs, name) if c.logprobs else [])
    return "".join(c.text for c in chunks), lp


@pytest.fixture(scope="module")
def bos_smol(smollm2_gguf, tmp_path_factory):
    """SmolLM2 with ``tokenizer.ggml.add_bos_token`` set: its tokenizer puts its BOS (<|im_start|>) before a text."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("bos") / "smollm2-add-bos.gguf"
    shutil.copyfile(smollm2_gguf, path)
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][...] = True
    reader.data.flush()
    del reader
    srv = _server(path, SMOL, slots=1)
    try:
        yield srv
    finally:
        srv.__exit__(None, None, None)
        srv.batcher.close()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_echoed_prompt_lists_the_bos_its_tokenizer_added_with_an_empty_span(bos_smol, stream):
    prompt = "Dose: 5 µg, heart 🫀"
    batcher = bos_smol.batcher
    tokens = batcher.tokenize(prompt)
    assert tokens[1:] == batcher.tokenize(prompt, add_special=False)  # the tokenizer added tokens[0], the BOS
    bos = batcher.detokenize(tokens[:1])
    text, lp = echoed(bos_smol.client, prompt, stream)
    assert text.startswith(prompt) and not text.startswith(bos)  # the prompt as sent
    assert lp.tokens[0] == bos and lp.token_logprobs[0] is None and lp.text_offset[:2] == [0, 0]
    rest = type(lp)(tokens=lp.tokens[1:], token_logprobs=lp.token_logprobs[1:], top_logprobs=lp.top_logprobs[1:],
                    text_offset=lp.text_offset[1:])
    check_offsets(text, rest)  # every other token's offset indexes the echoed text
    whole = bos_smol.client.completions.create(model=SMOL, prompt=prompt, max_tokens=4, logprobs=1, echo=True)
    assert len(whole.choices[0].logprobs.tokens) == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.prompt_tokens == len(tokens)


def test_a_bos_the_client_sent_as_a_token_id_is_echoed_as_its_text(bos_smol):
    prompt = "Dose: 5 µg, heart 🫀"
    tokens = bos_smol.batcher.tokenize(prompt)
    bos = bos_smol.batcher.detokenize(tokens[:1])
    text, lp = echoed(bos_smol.client, tokens, stream=False)
    assert text.startswith(bos + prompt) and lp.text_offset[:2] == [0, len(bos)]
    check_offsets(text, lp)
