"""Clinicians' conversations against `edgemed serve`: what prompt-prefix reuse saves turn by turn.

    python -m edgemed.benchmarks.serve_conversation                      # Qwen2.5-0.5B Q4_K_M, 2 threads, 4 slots
    python -m edgemed.benchmarks.serve_conversation --model smollm2-135m-instruct --clinicians 2 --turns 3

With the defaults (4 clinicians, 8 turns, 96-token answers, whole cases of 460-500 tokens) the eighth turn's prompt
is about 1,500 tokens on Qwen2.5.

The workload, as clinicians have it: ``--clinicians`` people at once, each in a ``--turns``-turn chat through
``/v1/chat/completions`` (streaming with usage, greedy, ``--max-tokens`` per answer). The first user message is
a clinical case (one of the cases below, a different one per clinician, cut to ``--case-tokens`` when given);
the next ones are follow-up questions. Every turn resends the whole history (user and assistant messages so
far), so the prompt grows by the last answer and the new question each turn. Every conversation opens with the
same system message (a prefix shared across clinicians, as a deployed assistant has). The clinicians' requests
of a turn are sent together (a barrier per turn), so each turn's figures are over the same ``C`` requests.

Servers, same GGUF, threads, slots and context per slot, all started at once and measured one at a time:
- ``edgemed``: prompt-prefix reuse on (its default);
- ``edgemed-cold``: ``--no-prefix-cache``, every prompt computed from the start (``--no-cold`` leaves it out, and
  with it the answers check);
- ``llama-server`` with its own defaults (``-m -np -c -t`` and nothing else; the client sends no
  ``cache_prompt``), when ``python -m edgemed.benchmarks.anchors build`` has built it; else it is skipped.
Rounds interleave the servers, the order flipping every round; each round's conversations open with a line of
their own, so a round cannot reuse the previous round's cases (only the template's opening
and the system message are shared).

Per turn and server: TTFT p50/p99 over the clinicians (send -> first text chunk), prompt tokens and cached
tokens (``usage.prompt_tokens_details.cached_tokens``), decode tok/s per request (tokens after the first / time
from the first to the last chunk); the best round (lowest TTFT p50) is reported, every round is in the JSON.
With greedy decoding, each conversation's answers with reuse must equal those without: ``answers_identical``.
Goal: edgemed's TTFT p50 <= 1.0x llama-server's at every turn (``GOAL_RATIO``; the report marks each turn).
Results: benchmarks/results/serve_conversation-<model>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from edgemed.benchmarks.serve_bench_client import (EdgemedServer, LlamaServer, _Server, add_server_arg, run_gated, save_results, settle, ttft_cell,
                                                    sse_events)
from edgemed.benchmarks.serve_streams import percentile
from edgemed.benchmarks.provenance import machine, paired, paired_ratios, range_cell
from edgemed.errors import EdgemedError

SLOTS = 4
#: edgemed's TTFT / llama-server's (defaults), per turn, at most
GOAL_RATIO = 1.0

#: first user messages: one case per clinician (cycled past four), a few hundred tokens each
CASES = (
    "A 67-year-old man comes to the emergency department with two hours of crushing central chest pain radiating "
    "to the left arm, with sweating and nausea. He has type 2 diabetes treated with metformin, hypertension treated "
    "with amlodipine, and he smoked twenty cigarettes a day for forty years until last year. On arrival his blood "
    "pressure is 148/92 mmHg, heart rate 104 per minute, respiratory rate 22 per minute, oxygen saturation 94% on "
    "room air, temperature 36.9 C. He is pale and clammy; heart sounds are normal without murmur; there are fine "
    "crackles at both lung bases. The ECG shows 3 mm ST elevation in leads II, III and aVF with ST depression in "
    "leads I and aVL. The first high-sensitivity troponin T is 86 ng/L. Creatinine is 1.3 mg/dL, potassium 4.6 "
    "mmol/L, glucose 212 mg/dL, haemoglobin 14.1 g/dL, platelets 232 x10^9/L. He took aspirin 300 mg from the "
    "ambulance crew. The nearest catheterisation laboratory is forty minutes away by road. His wife reports that "
    "he had two shorter episodes of similar pain on exertion during the last week that settled with rest, and "
    "that he has had an allergy to iodinated contrast with hives after a CT scan five years ago. "
    "Background: he had a transient ischaemic attack three years ago with left arm weakness that resolved within an "
    "hour; a carotid ultrasound then showed 40% stenosis on the right. His last HbA1c was 8.4%, LDL cholesterol 3.6 "
    "mmol/L, and he stopped atorvastatin because of muscle aches. He has chronic kidney disease stage 3a with an "
    "eGFR of 52 mL/min six months ago. He drinks about fourteen units of alcohol a week. His father died of a "
    "heart attack at 58 and his brother had coronary bypass surgery at 61. He lives with his wife, walks the dog "
    "twice a day and until last week could climb two flights of stairs without stopping. He has no history of "
    "bleeding, peptic ulcer or recent surgery, and takes no anticoagulant or antiplatelet medicine at home.",
    "A 34-year-old woman at 32 weeks of her second pregnancy presents with a headache for one day, blurred vision "
    "and pain under the right ribs. Her first pregnancy ended with an uncomplicated vaginal delivery. At booking "
    "her blood pressure was 112/70 mmHg. Today it is 168/110 mmHg and 164/108 mmHg fifteen minutes apart; heart "
    "rate 96 per minute. Urine dipstick shows protein 3+. She has oedema of the hands and face, brisk reflexes "
    "with three beats of clonus, and tenderness in the right upper quadrant. Laboratory results: haemoglobin 11.2 "
    "g/dL, platelets 88 x10^9/L, ALT 164 U/L, AST 190 U/L, LDH 720 U/L, creatinine 1.1 mg/dL, uric acid 7.4 mg/dL. "
    "The cardiotocograph shows a baseline of 140 beats per minute with reduced variability and no decelerations. "
    "Ultrasound estimates fetal weight at the 8th centile with raised umbilical artery resistance. She has asthma "
    "treated with an inhaled corticosteroid and uses salbutamol about once a month. She is worried about the baby "
    "and asks whether she can go home tonight to arrange care for her three-year-old son. "
    "Background: her booking blood tests were normal, including platelets of 245 x10^9/L, and a glucose tolerance "
    "test at 26 weeks was normal. Her mother had pre-eclampsia in both pregnancies. She took low-dose aspirin until "
    "she ran out of tablets at 20 weeks. The 20-week anomaly scan was normal with the placenta on the posterior "
    "wall. She has had no vaginal bleeding, no contractions and reports normal fetal movements until this morning, "
    "when she felt them less. She weighs 82 kg and is blood group O negative; she received anti-D at 28 weeks. "
    "She has no known drug allergies. The unit is a district hospital with a level 2 neonatal unit; the regional "
    "centre with neonatal intensive care is ninety minutes away, and the on-call anaesthetist is in theatre.",
    "An 8-year-old boy is brought by his mother with three days of fever up to 39.8 C, a sore throat and now a "
    "rash that started on the trunk. He has been drinking less and passed urine twice today. On examination he is "
    "alert but tired, heart rate 132 per minute, respiratory rate 24 per minute, capillary refill three seconds, "
    "temperature 39.1 C. Both eyes are red without discharge, the lips are cracked and red, the tongue looks like a "
    "strawberry, and there is a tender 2 cm lymph node on the right side of the neck. The hands and feet are "
    "swollen with red palms. The rash is maculopapular and spares the face. A rapid strep test is negative. Blood "
    "tests: white cells 16.8 x10^9/L with 78% neutrophils, haemoglobin 10.9 g/dL, platelets 410 x10^9/L, CRP 112 "
    "mg/L, ESR 68 mm/h, albumin 2.9 g/dL, ALT 72 U/L, sodium 133 mmol/L. Urine shows 20 white cells per high-power "
    "field and no nitrites. He had all his routine vaccinations. His younger sister had a cold last week; nobody "
    "else at home is unwell, and the family has not travelled. "
    "Background: he was born at term after an uncomplicated pregnancy and has had no serious illnesses; he had "
    "otitis media twice as a toddler treated with amoxicillin without any reaction. He has no known heart disease "
    "and no murmur was heard at his school health check. His mother noticed that the skin around his fingernails "
    "has started to look shiny. He has had mild abdominal pain and two loose stools today, no vomiting. He was "
    "given ibuprofen and paracetamol at home, which brought the fever down for only two to three hours. He weighs "
    "26 kg. An echocardiogram is available only on weekdays at this hospital; the children's cardiology service is "
    "at a centre two hours away, and the pharmacy can obtain intravenous immunoglobulin within about six hours.",
    "A 79-year-old woman living alone is brought in by her daughter, who found her more confused than usual over "
    "the last two days. She has mild Alzheimer's dementia, atrial fibrillation treated with apixaban 5 mg twice "
    "daily, heart failure with reduced ejection fraction treated with bisoprolol, ramipril and furosemide 40 mg "
    "daily, and osteoarthritis for which she has recently been buying ibuprofen over the counter. She weighs 48 "
    "kg. She is drowsy but rousable, oriented to person only, blood pressure 98/58 mmHg, heart rate 112 per minute "
    "and irregular, respiratory rate 20 per minute, oxygen saturation 95%, temperature 37.8 C. The mucous membranes "
    "are dry and there is no neck stiffness. Blood tests: sodium 128 mmol/L, potassium 5.9 mmol/L, urea 24 mmol/L, "
    "creatinine 2.4 mg/dL (1.1 mg/dL three months ago), white cells 13.2 x10^9/L, CRP 86 mg/L. Urine is cloudy "
    "with leucocytes and nitrites. The daughter says her mother fell in the kitchen three days ago and hit her head, "
    "and that the pill organiser for the last week is only half empty. "
    "Background: her last echocardiogram showed an ejection fraction of 30% with moderate mitral regurgitation. "
    "She had a hip fracture two years ago treated with a hemiarthroplasty and walks with a frame. Her baseline is "
    "independent in washing and dressing with a carer who visits once a day; she scored 21 out of 30 on a memory "
    "test last year. She has had two urinary tract infections this year, the last treated with nitrofurantoin. "
    "She has a documented allergy to penicillin with a rash. She has said in the past that she would not want to "
    "be resuscitated, but there is no written decision in her notes. Her daughter holds lasting power of attorney "
    "for health decisions and asks whether a scan of the head is needed given the fall and the blood thinner.",
)

#: the system message every conversation opens with (the same for all: a prefix shared across clinicians)
SYSTEM = ("You are a clinical decision-support assistant used by doctors and nurses in a hospital. Answer the "
          "clinician's questions about the case they describe. Be concise and specific: give the most likely "
          "diagnosis first, then the reasoning, the key investigations and the immediate management, with doses "
          "for an adult or a child as appropriate. Say clearly when a finding needs urgent senior review or a "
          "transfer, and when the information given is not enough to decide. Follow current international "
          "guidelines, mention important drug interactions, allergies and kidney function when choosing medicines, "
          "and do not invent test results that were not given. The clinician remains responsible for every decision.")

#: the follow-up questions of turns 2, 3, ... (cycled past the end)
FOLLOW_UPS = (
    "Thank you. What is your leading diagnosis, and which of the findings and results support it most strongly?",
    "Which other diagnoses must be ruled out before we commit to that, and how would you rule them out here, today?",
    "Which investigations would you order next, in order of priority, and what result would change the plan?",
    "Outline the treatment for the first hour, with doses where they matter, given the weight, allergies and kidneys.",
    "Which of the current medicines would you stop, hold or adjust now, and for how long? Please explain why for each.",
    "What complications should the nursing and medical team watch for over the next 24 hours, and how often?",
    "How would you explain the situation and the plan to the patient and the family, in plain and honest words?",
    "What findings would make you escalate care, to whom, and how quickly should that happen in this hospital?",
    "Please summarize the case, the working diagnosis and the plan in five short lines for the night handover.",
)


def model_path(name: str) -> Path:
    from edgemed.benchmarks.serve_vs_llama_server import model_path as resolve

    return resolve(name)


class EdgemedCold(EdgemedServer):
    """`edgemed serve --no-prefix-cache`, under its own name (and log)."""

    name = "edgemed-cold"


class LlamaServerDefaults(LlamaServer):
    """llama-server as it comes: slots, context, threads and the address; every other setting its default."""

    def command(self) -> list[str]:
        return [str(self.binary), "-m", str(self.path), "--host", "127.0.0.1", "--port", str(self.port),
                "-np", str(self.slots), "-c", str(self.slots * self.ctx_per_slot), "-t", str(self.threads), *self.extra]


def cut_case(text: str, max_tokens: int, count) -> str:
    """The case's leading sentences that fit in ``max_tokens`` (``count(text)`` -> tokens); 0 keeps it whole."""
    if max_tokens <= 0 or count(text) <= max_tokens:
        return text
    sentences = text.split(". ")
    kept = sentences[:1]
    for s in sentences[1:]:
        if count(". ".join(kept + [s]) + ".") > max_tokens:
            break
        kept.append(s)
    return ". ".join(kept).rstrip(".") + "."


def chat_turn(client, server: _Server, messages: list[dict], max_tokens: int) -> dict:
    """One streaming /v1/chat/completions request: its text, TTFT, decode rate and usage (prompt, cached)."""
    body = {"model": server.model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    usage: dict = {}
    finish = None
    # sse_events raises on an error event after the 200 header and on a stream cut off before [DONE]
    for now, event in sse_events(client, server, "/v1/chat/completions", body):
        for choice in event.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                times.append(now)
                parts.append(piece)
            finish = choice.get("finish_reason") or finish
        usage = event.get("usage") or usage
    if finish is None:  # an answer that never finished is no turn: its text would go into the history as if it were
        raise EdgemedError(f"{server.name} ended a chat turn without a finish_reason after {len(parts)} text chunks: "
                           "the answer did not finish", f"read {server.log}")
    tokens = usage.get("completion_tokens") or len(times)
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    return {"text": "".join(parts), "ttft_s": (times[0] - t0) if times else float("nan"), "tokens": tokens,
            "decode_tok_s": (tokens - 1) / decode_s if decode_s else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def run_conversations(server: _Server, openings: list[str], turns: int, max_tokens: int,
                      think_s: float = 0.0) -> list[list[dict]]:
    """One thread per clinician; turn ``t`` of every clinician is sent together, each clinician having read its
    last answer for ``think_s`` seconds first (0: the next question the moment the last answer ends).
    Returns rows[clinician][turn]."""
    import httpx2

    n = len(openings)
    rows: list[list[dict]] = [[] for _ in range(n)]

    def clinician(i: int, gate) -> None:
        messages: list[dict] = [{"role": "system", "content": SYSTEM}]
        with httpx2.Client() as client:
            for t in range(turns):
                messages.append({"role": "user", "content": openings[i] if t == 0 else FOLLOW_UPS[(t - 1) % len(FOLLOW_UPS)]})
                if t and think_s:
                    time.sleep(think_s)  # reading the answer, typing the next question
                gate.wait()
                row = chat_turn(client, server, messages, max_tokens)
                messages.append({"role": "assistant", "content": row["text"]})
                rows[i].append(row)

    run_gated(n, clinician)
    return rows


def turn_stats(rows: list[list[dict]]) -> list[dict]:
    """Per turn, over the clinicians: TTFT p50/p99, prompt and cached tokens (mean, min, max), decode tok/s median,
    and each clinician's TTFT and computed (not cached) prompt tokens."""
    out = []
    for t in range(min(len(r) for r in rows)):
        col = [r[t] for r in rows]
        ttft = [x["ttft_s"] for x in col]
        prompt = [x["prompt_tokens"] for x in col if x["prompt_tokens"] is not None]
        cached = [x["cached_tokens"] for x in col if x["cached_tokens"] is not None]
        rate = [x["decode_tok_s"] for x in col if x["decode_tok_s"]]
        out.append({"turn": t + 1, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                    "prompt_tokens_mean": statistics.mean(prompt) if prompt else None,
                    "prompt_tokens_max": max(prompt) if prompt else None,
                    "cached_tokens_mean": statistics.mean(cached) if cached else None,
                    "cached_tokens_min": min(cached) if cached else None,
                    "cached_share": (sum(cached) / sum(prompt)) if cached and prompt and len(cached) == len(prompt) else None,
                    "decode_tok_s_median": statistics.median(rate) if rate else None,
                    "completion_tokens": sum(x["tokens"] for x in col),
                    # per clinician, in clinician order: where each one's wait went (not only the percentiles)
                    "ttft_s": [_r(x) for x in ttft],
                    "computed_tokens": [None if x["prompt_tokens"] is None or x["cached_tokens"] is None
                                        else x["prompt_tokens"] - x["cached_tokens"] for x in col]})
    return out


def summarize(runs: dict[str, list[dict]], turns: int) -> dict:
    """Each server's best run per turn (lowest TTFT p50), and per turn edgemed's TTFT p50 over each other server's
    taken inside each round (both under the same load): ``ratios`` are the medians of those per-round ratios,
    ``ratios_paired`` their rounds, range and (against llama-server) the goal, judged on the median."""
    best = {name: [min((run["turns"][t] for run in rs), key=lambda x: x["ttft_p50_s"]) for t in range(turns)]
            for name, rs in runs.items()}

    def p50(t: int):
        return lambda run: run["turns"][t]["ttft_p50_s"] if t < len(run["turns"]) else None

    pairs = {o: [paired(paired_ratios(runs["edgemed"], runs[o], p50(t)), GOAL_RATIO if o == "llama-server" else None,
                        at_most=True) for t in range(turns)] for o in runs if o != "edgemed"}
    return {"best": _r(best), "ratios": {o: [x["median"] for x in ps] for o, ps in pairs.items()}, "ratios_paired": pairs}


def rerender(path: Path) -> None:
    """Recompute a stored result's bests and ratios from the per-round runs in its JSON; rewrite the JSON and page."""
    import json

    m = json.loads(path.read_text())
    m.update(summarize(m["runs"], m["turns"]))
    save_results(path, m, report_md(m))


def first_difference(a: list[list[str]], b: list[list[str]]) -> list[int | None]:
    """Per conversation, the first turn (1-based) whose answer differs between ``a`` and ``b``; None when all equal."""
    out = []
    for ca, cb in zip(a, b):
        shorter = None if len(ca) == len(cb) else min(len(ca), len(cb)) + 1  # a missing turn differs too
        out.append(next((t + 1 for t, (x, y) in enumerate(zip(ca, cb)) if x != y), shorter))
    return out


def _r(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: _r(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_r(x) for x in v]
    return v


def _f(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def goal_mark(ratio: float | None, goal: float, at_most: bool = True) -> str:
    """"met" / "not met" for a ratio against its goal (``at_most``: the ratio must not exceed it), "-" without one."""
    if ratio is None:
        return "-"
    return "met" if (ratio <= goal if at_most else ratio >= goal) else "not met"


def _ratio_cell(m: dict, o: str, i: int) -> str:
    """Turn ``i``'s ratio against ``o``: the paired median with its range (a result stored before the ratios were
    paired: its single figure), and against llama-server the goal, with the rounds that miss it."""
    value = m["ratios"][o][i]
    p = (m.get("ratios_paired") or {}).get(o)
    p = p[i] if p and i < len(p) else None
    cell = range_cell(p) if p else _f(value, "{:.3f}x")
    if o == "llama-server":
        miss = (p or {}).get("rounds_missing_goal")
        cell += (f" (goal <= {GOAL_RATIO}x: {goal_mark(value, GOAL_RATIO)}"
                 + (f"; {miss} of {len(p['per_round'])} rounds miss it" if miss else "") + ")")
    return cell


def report_md(m: dict) -> str:
    lines = [f"# Clinicians' conversations: {m['model']}", "",
             f"{m['clinicians']} clinicians at once, {m['turns']} turns each (the whole history resent every turn), "
             f"greedy, {m['max_tokens']} tokens per answer; {m['threads']} threads, {m['slots']} slots, "
             f"{m['n_ctx_per_slot']} tokens per slot; {m['rounds']} interleaved rounds: each server's figures are its best "
             f"round per turn (lowest TTFT p50), the ratios are taken inside each round (both servers under the same "
             f"load), their median with the range over the rounds, the goal judged on the median. Shared {m['machine']['cpu_count']}-CPU box: load averages per run are in the JSON.", "",
             f"Command: `{m['command']}`", ""]
    if m.get("server_args"):
        lines += [f"llama-server's own defaults, and `{' '.join(m['server_args'])}`, which this host needs to run it.", ""]
    if m.get("llama_server_skipped"):
        lines += [f"llama-server skipped: {m['llama_server_skipped']}", ""]
    names = list(m["servers"])
    for name in names:
        best = m["best"][name]
        lines += [f"## {name}", "", "| turn | prompt tokens | cached tokens (mean, min) | TTFT p50 / p99 (n clinicians) | decode tok/s |"
                  + "".join(f" TTFT p50 ratio vs {o} |" for o in names if o != name and name == "edgemed"),
                  "|---|---|---|---|---|" + "".join("---|" for o in names if o != name and name == "edgemed")]
        for i, s in enumerate(best):
            extra = "".join(f" {_ratio_cell(m, o, i)}" + " |"
                            for o in names if o != name and name == "edgemed")
            lines.append(f"| {s['turn']} | {_f(s['prompt_tokens_mean'], '{:.0f}')} | "
                         f"{_f(s['cached_tokens_mean'], '{:.0f}')}, {_f(s['cached_tokens_min'], '{:.0f}')} | "
                         f"{ttft_cell(s['ttft_p50_s'], s['ttft_p99_s'], len(s.get('ttft_s') or ()))} | "
                         f"{_f(s['decode_tok_s_median'], '{:.1f}')} |{extra}")
        lines.append("")
    if m["answers_identical"] is not None:
        lines.append(f"Answers with reuse equal to without (greedy, every conversation, every round): "
                     f"{m['answers_identical']}" + ("" if m["answers_identical"] else
                                                    f" (first differing turn per conversation: {m['first_difference']})"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b-instruct", help="an installed example model name or a .gguf path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=SLOTS)
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot (the last turn must fit)")
    ap.add_argument("--clinicians", type=int, default=4, help="conversations at once")
    ap.add_argument("--turns", type=int, default=8, help="turns per conversation")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens per answer (greedy)")
    ap.add_argument("--case-tokens", type=int, default=0, help="cut each opening case to about this many tokens (0: whole)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (server order flips each round)")
    ap.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                    help="also run edgemed --no-prefix-cache and check the answers equal (--no-cold: faster)")
    add_server_arg(ap)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rerender", type=Path, metavar="JSON",
                    help="recompute a stored result's ratios from its per-round runs and rewrite its JSON and page")
    args = ap.parse_args(argv)
    if args.rerender:
        return rerender(args.rerender)

    from edgemed.benchmarks import anchors
    from edgemed.runtime.llamacpp import Model

    path = model_path(args.model)
    vocab = Model(path, vocab_only=True)
    try:
        cases = [cut_case(CASES[i % len(CASES)], args.case_tokens, lambda s: len(vocab.tokenize(s)))
                 for i in range(args.clinicians)]
        case_tokens = [len(vocab.tokenize(c)) for c in cases]
    finally:
        vocab.close()
    common = dict(path=path, threads=args.threads, slots=args.slots, ctx_per_slot=args.ctx)
    servers: dict[str, _Server] = {"edgemed": EdgemedServer(**common, prefix_cache=True)}
    if args.cold:
        servers["edgemed-cold"] = EdgemedCold(**common, prefix_cache=False)
    skipped = None
    try:
        servers["llama-server"] = LlamaServerDefaults(anchors.binaries()["llama-server"], extra=args.server_arg, **common)
    except EdgemedError as exc:
        skipped = str(exc).splitlines()[0] + " Run `python -m edgemed.benchmarks.anchors build` to include it."
        print(f"llama-server skipped: {skipped}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    answers: dict[str, list[list[list[str]]]] = {name: [] for name in servers}  # [round][clinician][turn]
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():  # warm-up: one short request each, not timed
            run_conversations(s, ["Say hello."], 1, 8)
        for r in range(args.rounds):
            openings = [f"Consultation {r + 1}.{i + 1}.\n\n{c}" for i, c in enumerate(cases)]
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for name in order:
                settle_s = settle(servers.values())
                load0 = os.getloadavg()
                t0 = time.perf_counter()
                rows = run_conversations(servers[name], openings, args.turns, args.max_tokens)
                wall = time.perf_counter() - t0
                stats = turn_stats(rows)
                runs[name].append({"round": r, "wall_s": wall, "loadavg": (load0[0], os.getloadavg()[0]),
                                   "settle_s": settle_s, "turns": stats})
                answers[name].append([[x["text"] for x in conv] for conv in rows])
                print(f"round {r} {name:>12s}: " + ", ".join(
                    f"t{s['turn']} {s['ttft_p50_s']:.2f}s/{_f(s['cached_tokens_mean'], '{:.0f}')}c" for s in stats)
                    + f" (TTFT p50 / cached tokens), load {load0[0]:.1f}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    summary = summarize(runs, args.turns)
    diff = [first_difference(a, b) for a, b in zip(answers["edgemed"], answers["edgemed-cold"])] if args.cold else None
    result = {"model": path.name, "model_path": str(path), "threads": args.threads, "slots": args.slots,
              "n_ctx_per_slot": args.ctx, "clinicians": args.clinicians, "turns": args.turns,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "case_tokens": case_tokens,
              "answers_identical": all(d is None for rnd in diff for d in rnd) if args.cold else None,
              "first_difference": diff, "goal_ratio": GOAL_RATIO,
              "llama_server_skipped": skipped,
              **summary,
              "runs": _r(runs), "servers": {k: s.describe() for k, s in servers.items()},
              "server_args": list(args.server_arg),
              "command": "python -m edgemed.benchmarks.serve_conversation " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine()}
    if "llama-server" in servers and args.cold:
        result["llama_server_first_difference_vs_cold"] = [first_difference(a, b) for a, b in
                                                     zip(answers["llama-server"], answers["edgemed-cold"])]
    out = args.out or Path(__file__).resolve().parent / "results" / f"serve_conversation-{path.stem}-t{args.threads}.json"
    if out.suffix != ".json":
        out = out / f"serve_conversation-{path.stem}-t{args.threads}.json"
    save_results(out, result, report_md(result))


if __name__ == "__main__":
    main()
