"""The OpenAI surface, case by case, with the official ``openai`` client: `edgemed serve` and llama.cpp's `llama-server`
(``--jinja``, so tools go through the model's own chat template) on the same GGUF, side by side.

    python -m edgemed.benchmarks.anchors build            # once: llama-server from the installed sdist
    python -m edgemed.benchmarks.openai_conformance       # Qwen2.5-0.5B, 1 thread, 2 slots

Each case sends what a real client sends and checks the answer's shape and meaning (not its wording): a case
**passes** when the server answers it as OpenAI documents (an error case: the right 4xx in OpenAI's shape),
is **refused** when the server answers a valid request with a 4xx, and **fails** on a wrong answer or a 5xx.
The servers run one after the other (never both at once on the shared cores), same file, threads, slots and
context. Results: benchmarks/results/openai_conformance/<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

from edgemed.benchmarks.serve_bench_client import EdgemedServer, LlamaServer, add_server_arg, matched_extra_buffers, save_results

RESULTS = Path(__file__).parent / "results" / "openai_conformance"
SLOTS = 2
CTX = 1024

DOSE = {"type": "function", "function": {
    "name": "dose_calculator", "description": "Compute a drug dose in mg from the patient's weight.",
    "parameters": {"type": "object", "properties": {"drug": {"type": "string"}, "weight_kg": {"type": "number"}},
                   "required": ["drug", "weight_kg"]}}}
FORMULARY = {"type": "function", "function": {
    "name": "formulary_lookup", "description": "Look up a drug in the hospital formulary.",
    "parameters": {"type": "object", "properties": {"drug": {"type": "string"}}, "required": ["drug"]}}}
TOOLS = [DOSE, FORMULARY]
ASK = [{"role": "user", "content": "What paracetamol dose for a 20 kg child? Use the dose calculator."}]
Q = [{"role": "user", "content": "Which vitamin deficiency causes scurvy? Answer in one sentence."}]


class Refused(Exception):
    """A valid request answered with a 4xx."""


def check(cond: bool, why: str) -> None:
    if not cond:
        raise AssertionError(why)


def calls_valid(message, names=None) -> list[dict]:
    """The arguments of ``message``'s tool calls, each checked against its function's schema."""
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    calls = message.tool_calls
    check(bool(calls), f"no tool_calls; content {(message.content or '')[:60]!r}")
    out = []
    for call in calls:
        check(call.function.name in schemas and (names is None or call.function.name in names),
              f"unexpected function {call.function.name}")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, schemas[call.function.name])
        out.append(args)
    return out


def stream_calls(chunks) -> tuple[dict, str | None]:
    calls: dict[int, dict] = {}
    reason = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        reason = chunk.choices[0].finish_reason or reason
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            c["id"] = c["id"] or d.id
            if d.function:
                c["name"] = c["name"] or d.function.name
                c["arguments"] += d.function.arguments or ""
    return calls, reason


# -- the cases: name -> fn(client, model id, http base url) ---------------------------------------------------------
def _models_list(c, m, url):
    check([x.id for x in c.models.list().data] == [m], "the served id")


def _models_retrieve(c, m, url):
    check(c.models.retrieve(m).id == m, "retrieve")


def _chat(c, m, url):
    r = c.chat.completions.create(model=m, messages=Q, max_tokens=16)
    check(bool(r.choices[0].message.content) and r.usage.completion_tokens <= 16, "content and usage")


def _chat_stream(c, m, url):
    chunks = list(c.chat.completions.create(model=m, messages=Q, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    check("".join(x.choices[0].delta.content or "" for x in chunks if x.choices) != "", "streamed text")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, "usage chunk")


def _completions(c, m, url):
    check(c.completions.create(model=m, prompt="The heart has four", max_tokens=6).choices[0].text != "", "text")


def _completions_stream(c, m, url):
    parts = list(c.completions.create(model=m, prompt="The heart has four", max_tokens=6, stream=True))
    check("".join(p.choices[0].text for p in parts if p.choices) != "", "streamed text")


def _developer_role(c, m, url):
    r = c.chat.completions.create(model=m, max_tokens=8, messages=[{"role": "developer", "content": "Be brief."}] + Q)
    check(bool(r.choices[0].message.content), "content")


def _content_parts(c, m, url):
    parts = [{"type": "text", "text": "Which vitamin prevents scurvy?"}, {"type": "text", "text": " One word."}]
    r = c.chat.completions.create(model=m, max_tokens=8, messages=[{"role": "user", "content": parts}])
    check(bool(r.choices[0].message.content), "content")


def _max_completion_tokens(c, m, url):
    r = c.chat.completions.create(model=m, messages=Q, max_completion_tokens=3)
    check(r.usage.completion_tokens <= 3, "capped at 3")


def _max_tokens_capped(c, m, url):
    r = c.chat.completions.create(model=m, messages=Q, max_tokens=CTX * 8, temperature=0,
                                  logit_bias={str(t): -100 for t in _eos(url, m)})
    check(r.choices[0].finish_reason == "length", f"finish_reason {r.choices[0].finish_reason}")
    check(r.usage.prompt_tokens + r.usage.completion_tokens <= CTX, "inside the slot's context")


def _eos(url, m) -> list[int]:
    import httpx2

    r = httpx2.post(url + "/tokenize", json={"content": "<|im_end|><|endoftext|>", "parse_special": True}, timeout=30)
    if r.status_code == 200:
        return r.json()["tokens"]
    return [151645, 151643]  # Qwen2.5's <|im_end|>, <|endoftext|> (edgemed has no /tokenize)


def _prompt_too_long(c, m, url):
    import openai

    try:
        c.chat.completions.create(model=m, messages=[{"role": "user", "content": "note " * (CTX + 50)}], max_tokens=4)
    except openai.BadRequestError:
        return
    raise AssertionError("a prompt beyond the context was answered")


def _json_schema(c, m, url):
    schema = {"type": "object", "properties": {"vitamin": {"type": "string"}}, "required": ["vitamin"]}
    r = c.chat.completions.create(model=m, messages=Q, max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    check("vitamin" in json.loads(r.choices[0].message.content), "schema followed")


def _json_object(c, m, url):
    r = c.chat.completions.create(model=m, messages=Q, max_tokens=40, response_format={"type": "json_object"})
    check(isinstance(json.loads(r.choices[0].message.content), dict), "a JSON object")


def _stop(c, m, url):
    r = c.completions.create(model=m, prompt="1, 2, 3, 4,", max_tokens=12, stop=[" 6"])
    check(" 6" not in r.choices[0].text and r.choices[0].finish_reason == "stop", "stopped before ' 6'")


def _seed(c, m, url):
    a, b = (c.chat.completions.create(model=m, messages=Q, max_tokens=12, temperature=0.9, seed=11)
            .choices[0].message.content for _ in range(2))
    check(a == b, "same seed, same answer")


def _chat_logprobs(c, m, url):
    r = c.chat.completions.create(model=m, messages=Q, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    check(len(content) == r.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content), "entries")
    check(all(e.logprob <= 0 for e in content), "log probabilities")


def _completion_logprobs(c, m, url):
    r = c.completions.create(model=m, prompt="The heart has four", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    check(lp is not None and lp.tokens is not None, "no logprobs in the answer")
    check(len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens, "parallel lists")


def _echo(c, m, url):
    r = c.completions.create(model=m, prompt="The heart has four", max_tokens=3, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    check(r.choices[0].text.startswith("The heart has four"), f"no echo: text {r.choices[0].text[:40]!r}")
    check(lp is not None and lp.token_logprobs and lp.token_logprobs[0] is None, "no prompt logprobs")
    check(len(lp.tokens) > r.usage.completion_tokens, "prompt tokens scored")


def _logit_bias(c, m, url):
    first = c.chat.completions.create(model=m, messages=Q, max_tokens=1, logprobs=True).choices[0].logprobs.content[0]
    import httpx2

    tok = httpx2.post(url + "/tokenize", json={"content": first.token}, timeout=30)
    ids = tok.json()["tokens"] if tok.status_code == 200 else None
    if ids is None:
        from edgemed.runtime.llamacpp import Model

        vocab = Model(MODEL_PATH, vocab_only=True)
        ids = vocab.tokenize(first.token)
        vocab.close()
    r = c.chat.completions.create(model=m, messages=Q, max_tokens=12, temperature=1.0, seed=3, logprobs=True,
                                  logit_bias={str(ids[0]): -100})
    check(all(e.bytes != first.bytes for e in r.choices[0].logprobs.content), "banned token appeared")


def _penalties(c, m, url):
    prompt = "List: apple, apple, apple, apple, apple,"
    plain = c.completions.create(model=m, prompt=prompt, max_tokens=16).choices[0].text
    freq = c.completions.create(model=m, prompt=prompt, max_tokens=16, frequency_penalty=2.0,
                                presence_penalty=1.0).choices[0].text
    check(freq != plain, "penalties changed nothing")


def _n(c, m, url):
    r = c.chat.completions.create(model=m, messages=Q, n=2, max_tokens=8, temperature=0.8)
    check([x.index for x in r.choices] == [0, 1], "two choices")


def _prompt_list(c, m, url):
    r = c.completions.create(model=m, prompt=["The lungs", "The liver"], max_tokens=4)
    check(sorted(x.index for x in r.choices) == [0, 1], "one choice per prompt")


def _tool_named(c, m, url):
    named = {"type": "function", "function": {"name": "formulary_lookup"}}
    r = c.chat.completions.create(model=m, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=48)
    calls_valid(r.choices[0].message, {"formulary_lookup"})
    check(r.choices[0].finish_reason == "tool_calls", f"finish_reason {r.choices[0].finish_reason}")


def _tool_required(c, m, url):
    r = c.chat.completions.create(model=m, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=48)
    calls_valid(r.choices[0].message)


def _tool_auto(c, m, url):
    r = c.chat.completions.create(model=m, messages=ASK, tools=TOOLS, max_tokens=64)
    calls_valid(r.choices[0].message)
    check(r.choices[0].finish_reason == "tool_calls", f"finish_reason {r.choices[0].finish_reason}")


def _tool_auto_stream(c, m, url):
    import jsonschema

    calls, reason = stream_calls(c.chat.completions.create(model=m, messages=ASK, tools=TOOLS, max_tokens=64,
                                                           stream=True))
    check(bool(calls) and reason == "tool_calls", f"no streamed tool_calls (finish_reason {reason})")
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), DOSE["function"]["parameters"])


def _tool_parallel_off(c, m, url):
    r = c.chat.completions.create(model=m, messages=ASK, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=48)
    check(len(calls_valid(r.choices[0].message)) == 1, "one call")


def _tool_history(c, m, url):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "dose_calculator", "arguments": json.dumps({"drug": "paracetamol", "weight_kg": 20})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"dose_mg": 300})}]
    r = c.chat.completions.create(model=m, messages=history, tools=TOOLS, max_tokens=32)
    check(bool(r.choices[0].message.content or r.choices[0].message.tool_calls), "an answer")


def _tool_none(c, m, url):
    r = c.chat.completions.create(model=m, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8)
    check(not r.choices[0].message.tool_calls, "no calls with tool_choice none")


def _err_model(c, m, url):
    import openai

    try:
        c.chat.completions.create(model="gpt-4o", messages=Q, max_tokens=2)
    except openai.NotFoundError:
        return
    raise AssertionError("an unknown model was answered")


def _err_param(c, m, url):
    import openai

    try:
        c.chat.completions.create(model=m, messages=Q, max_tokens=2, temperature=5)
    except openai.BadRequestError as e:
        check((e.body or {}).get("param") == "temperature", f"param {(e.body or {}).get('param')!r}")
        return
    raise AssertionError("temperature 5 was accepted")


def _err_json(c, m, url):
    import httpx2

    r = httpx2.post(url + "/v1/chat/completions", content=b'{"model": 1,', headers={"content-type": "application/json"})
    check(r.status_code == 400 and set(r.json().get("error", {})) >= {"message", "type"}, f"status {r.status_code}")
    check(r.json()["error"].get("param") in (None, ""), f"param {r.json()['error'].get('param')!r}")


def _err_image(c, m, url):
    import openai

    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    try:
        c.chat.completions.create(model=m, messages=[{"role": "user", "content": parts}], max_tokens=4)
    except openai.BadRequestError as e:
        check("image" in str(e.message).lower(), e.message)
        return
    raise AssertionError("an image was answered by a text model")


CASES: dict[str, tuple[str, Callable]] = {
    "models.list": ("models", _models_list), "models.retrieve": ("models", _models_retrieve),
    "chat": ("basics", _chat), "chat stream + usage": ("basics", _chat_stream),
    "completions": ("basics", _completions), "completions stream": ("basics", _completions_stream),
    "developer role": ("basics", _developer_role), "content parts": ("basics", _content_parts),
    "max_completion_tokens": ("basics", _max_completion_tokens), "stop": ("basics", _stop), "seed": ("basics", _seed),
    "max_tokens capped (length)": ("context", _max_tokens_capped), "prompt too long: 400": ("context", _prompt_too_long),
    "json_schema": ("structured", _json_schema), "json_object": ("structured", _json_object),
    "chat logprobs + top_logprobs": ("logprobs", _chat_logprobs),
    "completions logprobs": ("logprobs", _completion_logprobs), "completions echo": ("logprobs", _echo),
    "logit_bias ban": ("sampling", _logit_bias), "presence/frequency penalty": ("sampling", _penalties),
    "n=2": ("sampling", _n), "list of prompts": ("sampling", _prompt_list),
    "tool_choice named": ("tools", _tool_named), "tool_choice required": ("tools", _tool_required),
    "tool_choice auto": ("tools", _tool_auto), "tools streamed": ("tools", _tool_auto_stream),
    "parallel_tool_calls false": ("tools", _tool_parallel_off), "tool history": ("tools", _tool_history),
    "tool_choice none": ("tools", _tool_none),
    "unknown model: 404": ("errors", _err_model), "param names the field": ("errors", _err_param),
    "malformed JSON: 400, no param": ("errors", _err_json), "image part: 400 saying so": ("errors", _err_image),
}
MODEL_PATH: Path | None = None


def run_cases(url: str, model_id: str) -> dict[str, dict]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    out = {}
    for name, (group, fn) in CASES.items():
        t0 = time.perf_counter()
        try:
            fn(client, model_id, url)
            status, detail = "pass", ""
        except openai.APIStatusError as e:
            status = "refused" if 400 <= e.status_code < 500 else "fail"
            detail = f"{e.status_code}: {str(e.message)[:200]}"
        except Exception as e:  # noqa: BLE001 - a wrong answer is the case's result, not the run's end
            status, detail = "fail", f"{type(e).__name__}: {str(e)[:200]}"
        out[name] = {"group": group, "status": status, "detail": detail, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"  {name:32s} {status:8s} {detail[:100]}", flush=True)
    return out


class JinjaLlamaServer(LlamaServer):
    def command(self) -> list[str]:
        return super().command() + ["--jinja"]  # tools through the GGUF's chat template, as edgemed does


def report_md(result: dict) -> str:
    servers = list(result["servers"])
    lines = [f"# OpenAI conformance: {result['model']}", "",
             f"`python -m edgemed.benchmarks.openai_conformance` on {result['host']['cpu']}, {result['threads']} thread, "
             f"{SLOTS} slots of {CTX} tokens, the official openai client {result['openai']}.", "",
             "A case passes when the answer is what OpenAI documents (for an error case: the right 4xx in OpenAI's "
             "shape); refused: a valid request answered with a 4xx; fail: a wrong answer or a 5xx. The detail is the "
             "first check that failed.", "",
             "| case | " + " | ".join(servers) + " |", "|---|" + "---|" * len(servers)]
    for name in CASES:
        cells = []
        for s in servers:
            r = result["servers"][s]["cases"][name]
            cells.append(r["status"] + (f" ({r['detail'][:70]})" if r["status"] != "pass" else ""))
        lines.append(f"| {name} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "| server | pass | refused | fail |", "|---|---|---|---|"]
    for s in servers:
        t = result["servers"][s]["totals"]
        lines.append(f"| {s} | {t['pass']} | {t['refused']} | {t['fail']} |")
    if "edgemed_covers_llama_server" in result:
        lines += ["", f"edgemed answers every case llama-server answers: **{result['edgemed_covers_llama_server']}**"
                  + (f" (not: {', '.join(result['llama_server_only'])})" if result["llama_server_only"] else "")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    global MODEL_PATH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="an installed example model name or a .gguf path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=("edgemed", "llama-server"))
    add_server_arg(ap)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import openai

    from edgemed.benchmarks import anchors
    from edgemed.benchmarks.serve_vs_llama_server import model_path

    MODEL_PATH = path = model_path(args.model)
    common = dict(path=path, threads=args.threads, slots=SLOTS, ctx_per_slot=CTX)
    makers = {"edgemed": lambda: EdgemedServer(**common, prefix_cache=True, extra_buffers=matched_extra_buffers(args.server_arg)),
              "llama-server": lambda: JinjaLlamaServer(anchors.binaries()["llama-server"], extra=args.server_arg, **common)}
    result = {"model": path.name, "threads": args.threads, "openai": openai.__version__,
              "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}, "servers": {}}
    for name, make in makers.items():
        if args.only and name != args.only:
            continue
        server = make()
        print(f"{name}: starting", flush=True)
        server.start()
        try:
            cases = run_cases(server.url, server.model_id)
        finally:
            server.stop()
        totals = {k: sum(1 for c in cases.values() if c["status"] == k) for k in ("pass", "refused", "fail")}
        result["servers"][name] = {"cases": cases, "totals": totals, "command": server.describe()["command"]}
    if len(result["servers"]) == 2:
        e, l_ = result["servers"]["edgemed"]["cases"], result["servers"]["llama-server"]["cases"]
        only = [n for n in CASES if l_[n]["status"] == "pass" and e[n]["status"] != "pass"]
        result["llama_server_only"] = only
        result["edgemed_covers_llama_server"] = not only
    out = args.out or RESULTS / f"{path.stem}.json"
    save_results(out, result, report_md(result))


if __name__ == "__main__":
    main()
