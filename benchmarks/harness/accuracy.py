"""Medical QA accuracy of one artifact, scored two ways, resumable item by item.

Each item becomes the prompt ``edgemed run --template`` would send: the project's template (``mcq`` for option
questions, ``pubmedqa`` for a question with its abstract; ``template="auto"`` picks by whether the item has a
context) builds the messages, the artifact's own chat template renders them (one without a system role gets the
system text before the question, in the user message, as ``edgemed run`` sends it: ``chat_template.fold_system``).

1. **Logits.** The contract's answer cue (``"Answer:"``, the choice contract's label) is appended to the assistant
   turn as plain text tokens, and the next-token distribution is read. A choice's probability is the total
   softmax mass of the first tokens of its spellings: ``"B"`` and ``" B"`` (after ``"Answer:"`` BPE models
   write the space-prefixed token), and for word choices also the capitalised ``"Yes"`` / ``" Yes"``. A first token
   shared by two choices is ambiguous and dropped for both. The prediction is the most probable choice; the
   record keeps the probabilities renormalised over the choices and ``mass``, the raw share the choices got.
2. **Generation** (``score="both"``; ``score="logits"`` leaves it out). Greedy decoding of up to
   ``max_gen_tokens`` from the plain prompt, parsed with the template's contract (``Template.parse``, as
   ``edgemed run`` parses); a reply without an answer is wrong and counted in ``unparsed`` (report.md's "no
   answer"), a hedge that offers a second option on the answer line ("Answer: C (or possibly D)") among them.
   Greedy, so the run is deterministic. Decoding stops at the end of the first line that parses ("Answer: B" then a newline): the
   explanation a model adds after its answer is not scored, and skipping it roughly halves the cost of an MCQ
   item on a CPU. A reply cut at ``max_gen_tokens`` is no answer, as ``edgemed run`` reads one.

**Reasoning models.** Where the chat template opens a thought itself (an R1 distill's prompt ends ``<think>\n``;
``thinks`` in the record), "Answer:" written inside it would score the model's musing: the logits cue follows the
thought closed at once (``"\n</think>\n\n"``, as ``edgemed run`` closes a capped one), and the generated answer
follows a thought capped at ``max_gen_tokens`` tokens and closed (``edgemed run --think cap:<max_gen_tokens>``),
parsed with the thought left out. A generated score of such a model therefore depends on ``max_gen_tokens``; the
report says when its items were scored so.

One JSON line per item goes to ``records_path`` (flushed and fsync'd); ids already there are skipped, so an
interrupted run resumes, and a run over a larger draw of the same sets (``datasets.draw`` is prefix-stable) scores
only the new items. A truncated last line (killed mid-write) is dropped and that item redone. Each record carries
``item_sha``, a digest of what the model was shown (question, options, gold, abstract): a record whose item has
changed (PubMedQA asked with its abstract, then without) is redone, not reused. The first line names the artifact
(name, size and sha256: Q4_K_M with and without an importance matrix have one size) and settings, and a resume with
different ones is refused; the bench runner starts such a file afresh (``records_resume``).

A generated reply's text (``reply``) is kept only with ``keep_replies``: scoring needs the parsed answer
(``gen_pred``, ``parsed_ok``), not the text, and a reply may repeat a clinic's own question back. A file holding
replies is made owner-only (0600); a resume without ``keep_replies`` drops the replies already there (``reply`` is
None in a record whose text was not kept, as in one with no generated answer). ``edgemed bench`` keeps none unless
told (``--keep-replies``), and a run without it takes them out of every records file in its folder.

Every item to score must fit the scorer's context (its cued prompt, and the reply with ``score="both"``): one that
does not stops the phase before any item is scored, named with the context that fits them all (``check_items_fit``),
rather than being left out of a figure whose key names the whole draw.

``logit_s`` and ``gen_s`` in each record split the item's time between the two scores (what the bench default,
logits only, saves).

The scorer reuses the KV cache of the shared prefix (system prompt; prompt -> prompt + cue). llama.cpp's
quantized kernels give batch-shape-dependent rounding (logits differ by KLD ~1e-3 between a 2-token and a
26-token batch for Q4_K_M), so a resumed run can differ from an uninterrupted one in the last digits of a
probability, not beyond the sampling error the Wilson interval states.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from edgemed.benchmarks.harness.datasets import Item
from edgemed.benchmarks.harness.stats import wilson
from edgemed.errors import ContextOverflow, InputError
from edgemed.runtime.chat_template import folded, probe_system_role, system_then_user
from edgemed.runtime.session import THOUGHT_CLOSING, starts_in_think
from edgemed.templates.think import CLOSE

log = logging.getLogger(__name__)

#: template="auto": an item with a context is a PubMedQA question with its abstract, anything else an MCQ
AUTO_TEMPLATE = {True: "pubmedqa", False: "mcq"}
RECORDS_VERSION = 11  # 2: generation stops after the first parsed answer line; 3: item_sha, logit_s / gen_s, score;
# 4: it stops at the labelled answer line only, and a hedge ("Answer: A or B") or "Answer: a patient" is no answer;
# 5: an answer is read only from a line that starts with the label; lines that disagree, or a choice only
# inferred, are no answer; 6: a LaTeX box ("\boxed{C}") is an answer line, and "Answer: Yes, no adverse events ..."
# is yes (a choice word running on into prose after a comma is prose, not a hedge); 7: the meta names the artifact's
# sha256 (two files of one name and size were taken for one) and, under the bench runner, the result's key; 8: a chat
# template that opens a thought (R1 distills) has it closed before the cue and the answer, and a reply cut at
# max_gen_tokens is no answer (records carry ``thinks``); 9: a hedge that offers a second option a few words after the
# answer ("Answer: C (or option D)", "C, but possibly D", "C|D") is no answer, the answer named again ("C (Vitamin C),
# or option C") is none, and a model whose chat template takes no system role is asked with the system text folded
# into the user message (``fold_system``): its prompt, and so its logits, changed too; 10: with a blank beside "/" or
# "|", the option after it must stand alone to be a second choice ("Answer: C / A and B are wrong" is C), written
# tight it always is one ("C|D: both fit" was C), and one under a condition after it is ("C (...) / D in pregnancy");
# 11: the answer named again and then another option offered is a hedge ("Answer: C (C or D)", "C (C/D)" were C), and
# an answer line that says its own answer is wrong is no answer ("Answer: C (C and D are both wrong)", "C (not C)");
# another option ruled out is still no hedge ("Answer: C (not D)", "C (C, since D is wrong)" are C)
#: A few replies and what the contract reads from each (the choice; None: no answer) under ``RECORDS_VERSION``, which
#: ``RECORDS_PARSES[0]`` names. tests/test_bench_resume_keys.py parses them again: a verdict that changed means records
#: written before would be resumed beside ones scored by other rules, so raise RECORDS_VERSION with the change and
#: write the new verdicts (and the new version) here.
RECORDS_PARSES = (11, (
    ("mcq", "Answer: C", "C"),
    ("mcq", "**Answer:** (C) Vitamin C", "C"),
    ("mcq", "Answer: C (or possibly D)", None),
    ("mcq", "Answer: C (or option D)", None),
    ("mcq", "Answer: C, but possibly D", None),
    ("mcq", "Answer: C|D", None),
    ("mcq", "Answer: C (Vitamin C), or option C", "C"),
    ("mcq", "Answer: C (Vitamin C) / A and B are wrong", "C"),
    ("mcq", "Answer: C / A and B are wrong", "C"),
    ("mcq", "Answer: C|D: both fit", None),
    ("mcq", "Answer: C (Vitamin C) / D in pregnancy", None),
    ("mcq", "Answer: C, or a mild variant of it", "C"),
    ("mcq", "Answer: C (C or D)", None),
    ("mcq", "Answer: C (C/D)", None),
    ("mcq", "Answer: C (C and D are both wrong)", None),
    ("mcq", "Answer: C (both C and D are wrong)", None),
    ("mcq", "Answer: C (not D)", "C"),
    ("mcq", "Answer: C (C, since D is wrong)", "C"),
    ("mcq", "Answer: C (C)", "C"),
    ("mcq", "Answer: A\n\nAnswer: C", None),
    ("mcq", "Scurvy is vitamin C deficiency.\n\n$\\boxed{C}$", "C"),
    ("mcq", "<think>Answer: A</think>\n\nAnswer: C", "C"),
    ("pubmedqa", "Answer: yes", "yes"),
    ("pubmedqa", "Answer: Yes, no adverse events were seen.", "yes"),
    ("pubmedqa", "Answer: yes (hazard ratio 0.7, 95% CI 0.6-0.9), probably yes", "yes"),
    ("pubmedqa", "Answer: yes (the data suggest so) / no harm seen", "yes"),
    ("pubmedqa", "Answer: yes, probably no", None),
))
#: what is scored per item: the letter logits alone, or the logits and a parsed greedy answer
SCORES = ("logits", "both")


# -- templates and choices -------------------------------------------------------------
def template_for(item: Item, template: str) -> str:
    return AUTO_TEMPLATE[item.context is not None] if template == "auto" else template


def template_inputs(tpl, item: Item) -> dict:
    """The item's fields the template declares (question, options, context)."""
    return {k: getattr(item, k) for k in tpl.inputs if getattr(item, k, None) is not None}


def letter_of(choice: str, item: Item, by_letter: bool) -> str | None:
    """The option letter a template choice stands for (letters map to themselves; "yes" -> the option that says yes)."""
    if by_letter:
        return choice if choice in item.options else None
    return next((k for k, v in item.options.items() if v.strip().lower() == choice.lower()), None)


def spellings(choice: str) -> list[str]:
    """How a reply may write ``choice`` right after "Answer:": with or without the space, capitalised or not."""
    cap = choice[:1].upper() + choice[1:]
    return list(dict.fromkeys([choice, " " + choice, cap, " " + cap]))


def choice_tokens(scorer, choices: tuple[str, ...]) -> dict[str, list[int]]:
    """Choice -> the first token of each of its spellings, with tokens two choices share removed."""
    firsts = {c: {scorer.tokenize(s, special=False)[0] for s in spellings(c)} for c in choices}
    owners: dict[int, set] = {}
    for c, toks in firsts.items():
        for t in toks:
            owners.setdefault(t, set()).add(c)
    out = {c: sorted(t for t in toks if len(owners[t]) == 1) for c, toks in firsts.items()}
    empty = [c for c, toks in out.items() if not toks]
    if empty:
        raise InputError(f"The choices {', '.join(empty)} have no first token of their own in this tokenizer.",
                         "use a template whose choices start with distinct tokens (letters A-E, yes/no/maybe)")
    return out


def choice_probs(logits, tokens: dict[str, list[int]]) -> tuple[dict[str, float], float]:
    """Probabilities over the choices (renormalised) and the raw softmax mass they hold together."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    raw = {c: float(p[toks].sum()) for c, toks in tokens.items()}
    mass = sum(raw.values())
    return {c: v / mass if mass > 0 else 1.0 / len(raw) for c, v in raw.items()}, mass


# -- records ----------------------------------------------------------------------------
def item_digest(item: Item) -> str:
    """A short digest of everything the model is shown for ``item`` and of its gold answer."""
    import hashlib

    body = json.dumps([item.question, item.options, item.answer, item.context], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def artifact_identity(path: Path, sha256: str | None = None) -> dict:
    """Name, size and sha256 (``artifacts.model_digest``; given by the caller that has it) of the scored artifact:
    two files of one name and size (Q4_K_M with and without an importance matrix) are told apart by the digest."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if sha256 is None:
        from edgemed.benchmarks.harness.artifacts import model_digest

        sha256 = model_digest(path)
    return {"name": path.name, "bytes": sum(f.stat().st_size for f in files), "sha256": sha256}


def read_records(path: Path) -> tuple[dict | None, dict[str, dict]]:
    """(meta, id -> record) from a records file; a truncated last line is cut off the file."""
    if not path.exists():
        return None, {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a truncated last line (%d bytes); that item is redone", path, len(data) - end)
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    meta, records = None, {}
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {lineno} is not valid JSON ({exc.msg}).",
                             "delete that line (its item is then redone) or start a new records file") from None
        if "meta" in obj:
            meta = obj["meta"]
        else:
            records[obj["id"]] = obj
    return meta, records


def records_meta(path: Path) -> dict | None:
    """The meta line of a records file (its first line), or None when there is none or it cannot be read."""
    try:
        with open(path, "rb") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    return first.get("meta") if isinstance(first, dict) and isinstance(first.get("meta"), dict) else None


def records_resume(path: Path, key: dict, settings) -> bool:
    """Whether the runner may resume the records file at ``path`` (a killed or finished accuracy phase) for a task
    with ``key``: its meta names the same artifact (sha256, not only name and size), the same scoring and the same
    key but for the draw of items (``configs.beyond_settings``). Records of another artifact, build or edgemed
    version are started afresh, never resumed on another model's answers."""
    from edgemed.benchmarks.harness.configs import beyond_settings

    meta = records_meta(path)
    if not meta or meta.get("version") != RECORDS_VERSION or meta.get("score") != settings.eval_score:
        return False
    return (meta.get("artifact") or {}).get("sha256") == key.get("model_sha256") and meta.get("key") == beyond_settings(key)


def append_record(path: Path, obj: dict) -> None:
    with open(path, "ab") as fh:  # created as the folder's other files are; ``private_replies`` narrows it
        fh.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def private_replies(path: Path, keep: bool) -> None:
    """Records at ``path`` that may hold replies' text (``keep``) made readable by their owner only; without
    ``keep``, the text of replies an earlier run kept is taken out (the file rewritten atomically, its mode kept; a
    line that does not parse, cut by a kill, is left for ``read_records``)."""
    from edgemed.files.atomic import write_text

    if keep:
        os.chmod(path, 0o600)
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("reply") is not None:
            line = (json.dumps({**obj, "reply": None}, ensure_ascii=False) + "\n").encode("utf-8")
        kept.append(line)
    if kept != lines:
        mode = os.stat(path).st_mode & 0o777
        write_text(path, b"".join(kept).decode("utf-8", errors="replace"))
        os.chmod(path, mode)


# -- one item ---------------------------------------------------------------------------
class _Prepared:
    """Templates, cue tokens and choice tokens, built once per template / choice set; whether the scorer's chat
    template takes a system role, learnt once per run (one scorer: one model, one chat template)."""

    def __init__(self, scorer):
        self.scorer = scorer
        self._templates: dict = {}
        self._tokens: dict = {}
        self._probed, self._no_system_role = False, None  # ``probe_system_role``'s answer, once probed

    def messages(self, tpl, inputs: dict) -> list[dict]:
        """``tpl``'s messages for ``inputs`` as ``chat_template.fold_system`` gives them to the chat template (the
        system message folded into the user's where the template takes none), at no render of their own: whether it
        takes a system role is probed once (``probe_system_role``, at the first item) and reused for every item, not
        probed again with each item's system text (two to four renders more, twice an item). A probe that fails is not
        kept: the item fails as ``fold_system`` failed it."""
        messages = tpl.messages(inputs)
        if not system_then_user(messages):
            return messages
        if not self._probed:
            self._no_system_role, self._probed = probe_system_role(self.scorer.render), True
        return folded(messages, self._no_system_role)[0]

    def template(self, name: str):
        if name not in self._templates:
            from edgemed.templates import get_template

            tpl = get_template(name)
            if tpl.contract.kind != "choice":
                raise InputError(f"Template '{name}' has a {tpl.contract.kind} contract, not a choice.",
                                 "evaluate with a choice template: mcq or pubmedqa")
            self._templates[name] = (tpl, self.scorer.tokenize(f"{tpl.contract.label}:", special=False))
        return self._templates[name]

    def tokens(self, choices: tuple[str, ...]) -> dict[str, list[int]]:
        if choices not in self._tokens:
            self._tokens[choices] = choice_tokens(self.scorer, choices)
        return self._tokens[choices]


def _asked(prepared: _Prepared, tpl, cue: list[int], inputs: dict) -> tuple[str, bool, list[int], list[int]]:
    """How an item is put to the model: the rendered prompt, whether it opens a thought, its tokens, and the tokens
    up to the answer cue."""
    scorer = prepared.scorer
    # as ``session.ask`` sends it: the system message folded into the user's where the chat template takes none (a
    # model with a system role gets the very messages the template wrote, so its stored results' prompts stand)
    rendered = scorer.render(prepared.messages(tpl, inputs))
    thinks = starts_in_think(rendered)  # a reasoning model's chat template opens the thought (R1: "<think>\n")
    prompt = scorer.tokenize(rendered)
    # the cue after the thought, closed as ``session.respond`` closes a capped one: "Answer:" inside an open thought
    # reads the model's musing, not its answer
    cued = (scorer.tokenize(rendered + THOUGHT_CLOSING) if thinks else prompt) + cue
    return rendered, thinks, prompt, cued


def positions_needed(scorer, prepared: _Prepared, item: Item, template: str, max_gen_tokens: int,
                     generate: bool) -> int:
    """Context positions ``score_item`` uses for ``item``: the cued prompt and its next token and, with ``generate``,
    the prompt and ``max_gen_tokens`` new tokens (for a model that thinks, a capped thought and then the answer)."""
    tpl, cue = prepared.template(template_for(item, template))
    _, thinks, prompt, cued = _asked(prepared, tpl, cue, template_inputs(tpl, item))
    need = len(cued) + 1
    if generate:
        need = max(need, len(cued) - len(cue) + 2 * max_gen_tokens if thinks else len(prompt) + max_gen_tokens)
    return need


def check_items_fit(scorer, prepared: _Prepared, items: list[Item], template: str, max_gen_tokens: int,
                    generate: bool) -> None:
    """Refuse, before any item is scored, items that do not fit the scorer's context, naming them and the context
    that fits them all. The whole phase, not the item: an accuracy without its longest items (PubMedQA with its longest
    abstracts) is a figure over another draw than the one its key and report name."""
    needs = {it.id: positions_needed(scorer, prepared, it, template, max_gen_tokens, generate) for it in items}
    over = {i: n for i, n in needs.items() if n > scorer.n_ctx}
    if not over:
        return
    longest = max(over.values())
    named = ", ".join(f"{i} needs {n}" for i, n in sorted(over.items(), key=lambda kv: -kv[1])[:5])
    more = f", and {len(over) - 5} more" if len(over) > 5 else ""
    shorter = "--no-eval-context to ask PubMedQA without its abstract" if any(
        it.context is not None for it in items if it.id in over) else ""
    wider = scorer.wider_context(longest)
    if wider:
        fix = f"{wider}: edgemed bench's --ctx is the accuracy context too" + (f"; or {shorter}" if shorter else "")
    else:  # past the trained context: no --ctx holds them
        fix = (f"the model was trained on {scorer.n_ctx_train} tokens, fewer than the {longest} positions the longest "
               "item needs: " + (f"pass {shorter}, " if shorter else "")
               + "leave those items out of the --eval file, or pass --skip-accuracy")
    raise ContextOverflow(
        f"{len(over)} of the {len(items)} evaluation items to score need more positions than "
        f"{scorer.context_words('accuracy')}: {named}{more}; none was scored.", fix)


def score_item(scorer, prepared: _Prepared, item: Item, template: str, max_gen_tokens: int,
               generate: bool = True) -> dict:
    name = template_for(item, template)
    tpl, cue = prepared.template(name)
    inputs = template_inputs(tpl, item)
    choices = tpl.choices(inputs)
    tokens = prepared.tokens(choices)
    by_letter = bool(tpl.contract.choices_from)
    letters = {c: letter_of(c, item, by_letter) for c in choices}
    if None in letters.values():
        raise InputError(f"Item {item.id}: template '{name}' offers {', '.join(choices)}, which do not map onto the "
                         f"item's options {item.options}.", "choose the template that matches the data set (--template)")

    before = dict(scorer.counters)
    start = time.perf_counter()
    rendered, thinks, prompt, cued = _asked(prepared, tpl, cue, inputs)
    probs, mass = choice_probs(scorer.next_logits(cued), tokens)
    logit_s = time.perf_counter() - start
    gen_pred = parsed_ok = reply = None
    gen_s = 0.0  # timed on its own: a logits-only record holds exactly 0, however long the box paused in between
    if generate:
        g0 = time.perf_counter()
        # stop at the end of the first line that holds the instructed 'Answer: X': the explanation after it is not
        # scored. Only that line: an answer inferred from a reply that starts by listing the options ("A. ...") would
        # stop the reply before the answer it goes on to give.
        def answered(text: str) -> bool:
            return text.endswith("\n") and tpl.parse(text, inputs).labelled

        thought, answer_prompt = "", prompt
        if thinks:  # as ``edgemed run --think cap:<max_gen_tokens>``: the thought, closed, then the answer
            thought, _ = scorer.greedy(prompt, max_gen_tokens, stop=(CLOSE,))
            thought += THOUGHT_CLOSING
            answer_prompt = scorer.tokenize(rendered + thought)
        answer, cut = scorer.greedy(answer_prompt, max_gen_tokens, until=answered)
        reply = thought + answer
        # a reply cut at the token limit is no answer, as ``session.ask`` reads it ("Answer: C (or possibly")
        parsed = tpl.parse(reply, inputs, started_in_think=thinks, truncated=cut)
        gen_pred, parsed_ok = (letters.get(parsed.value) if parsed.ok else None), parsed.ok
        gen_s = time.perf_counter() - g0
    seconds = time.perf_counter() - start
    logit_choice = max(probs, key=probs.get)
    return {
        "id": item.id, "dataset": item.dataset, "item_sha": item_digest(item), "template": name, "gold": item.answer,
        "logit_pred": letters[logit_choice], "probs": {letters[c]: round(p, 6) for c, p in probs.items()},
        "mass": round(mass, 6), "gen_pred": gen_pred, "parsed_ok": parsed_ok, "reply": reply,
        "thinks": thinks, "prompt_tokens": len(cued), "evaluated_tokens": scorer.counters["evaluated"] - before["evaluated"],
        "gen_tokens": scorer.counters["generated"] - before["generated"], "seconds": round(seconds, 4),
        "logit_s": round(logit_s, 4), "gen_s": round(gen_s, 4),
    }


# -- summary ----------------------------------------------------------------------------
def _rate(k: int, n: int) -> tuple[float | None, list[float]]:
    return (k / n if n else None), list(wilson(k, n))


def summarize(records: list[dict]) -> dict:
    """n, letter-logit accuracy + Wilson 95 % interval; the generated-answer figures over the records that have a
    generated answer (``n_gen``; ``acc_gen`` None when none has: ``score="logits"``)."""
    n = len(records)
    gen = [r for r in records if r.get("parsed_ok") is not None]
    acc_logit, ci_logit = _rate(sum(r["logit_pred"] == r["gold"] for r in records), n)
    acc_gen, ci_gen = _rate(sum(r["gen_pred"] == r["gold"] for r in gen), len(gen))
    return {"n": n, "acc_logit": acc_logit, "ci_logit": ci_logit, "n_gen": len(gen), "acc_gen": acc_gen,
            "ci_gen": ci_gen if gen else None, "unparsed": sum(not r["parsed_ok"] for r in gen),
            "thinking": sum(bool(r.get("thinks")) for r in records)}


def per_dataset(records: list[dict]) -> dict[str, dict]:
    """``summarize`` per data set, in the order the sets first appear."""
    return {ds: summarize([r for r in records if r["dataset"] == ds]) for ds in dict.fromkeys(r["dataset"] for r in records)}


def evaluate(scorer, items: list[Item], *, template: str = "auto", records_path: Path, max_gen_tokens: int = 16,
             score: str = "both", progress: bool = True, artifact_sha256: str | None = None, key: dict | None = None,
             keep_replies: bool = True) -> dict:
    """Score ``items`` with ``scorer`` (see the module docstring); returns the summary over all of them.

    ``artifact_sha256``: the scored artifact's digest where the caller has it (else computed); ``key``: the bench
    runner's result key without its settings (``configs.beyond_settings``), written into the meta line so that a
    resume under another runtime build or version is refused like one of another artifact. ``keep_replies``: write
    each generated reply's text into the records (made 0600); the bench runner passes its ``--keep-replies``."""
    if score not in SCORES:
        raise InputError(f"Unknown score {score!r}.", f"choose from: {', '.join(SCORES)}")
    records_path = Path(records_path)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"Item {dup} appears twice in the evaluation set.", "pass each data set file once")
    meta = {"version": RECORDS_VERSION, "artifact": artifact_identity(scorer.path, artifact_sha256), "template": template,
            "max_gen_tokens": max_gen_tokens, "score": score, **({"key": key} if key is not None else {})}
    old_meta, done = read_records(records_path)
    if old_meta is not None and old_meta != meta:
        raise InputError(f"{records_path} holds results of another run ({old_meta}), not {meta}.",
                         "pass a new --records file, or the same artifact and settings to resume")
    if old_meta is None and done:
        raise InputError(f"{records_path} has item records but no meta line.", "start a new records file")
    todo = [it for it in items if it.id not in done or done[it.id].get("item_sha") != item_digest(it)]
    prepared = _Prepared(scorer)
    check_items_fit(scorer, prepared, todo, template, max_gen_tokens, generate=score == "both")  # before any write
    if old_meta is None:
        records_path.parent.mkdir(parents=True, exist_ok=True)
        append_record(records_path, {"meta": meta})
    private_replies(records_path, keep_replies)
    log.info("%d items, %d already in %s, %d to score", len(items), len(items) - len(todo), records_path, len(todo))

    from tqdm import tqdm

    start = time.perf_counter()
    evaluated = 0
    with tqdm(total=len(todo), desc=f"accuracy {scorer.path.name}", unit="item", file=sys.stderr,
              disable=not progress) as bar:
        for item in todo:
            rec = score_item(scorer, prepared, item, template, max_gen_tokens, generate=score == "both")
            append_record(records_path, rec if keep_replies else {**rec, "reply": None})
            done[item.id] = rec
            evaluated += rec["evaluated_tokens"]
            bar.update(1)
    seconds = time.perf_counter() - start

    records = [done[i] for i in ids]
    out = summarize(records)
    out["per_dataset"] = per_dataset(records)
    total_s = sum(r["seconds"] for r in records)
    out.update({
        "score": score, "logit_seconds": round(sum(r["logit_s"] for r in records), 3),
        "new_items": len(todo), "resumed_items": len(items) - len(todo),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "evaluated_tokens": sum(r["evaluated_tokens"] for r in records),
        "gen_tokens": sum(r["gen_tokens"] for r in records),
        "seconds": round(total_s, 3), "seconds_this_run": round(seconds, 3),
        "items_per_s": len(records) / total_s if total_s else None,
        "evaluated_tok_per_s": evaluated / seconds if todo and seconds else None,
        "records": str(records_path),
    })
    return out


# -- python -m edgemed.benchmarks.harness.accuracy ----------------------------------------
def _main(argv=None) -> int:
    import click

    @click.command()
    @click.option("--artifact", required=True, type=click.Path(exists=True, path_type=Path),
                  help="a .gguf file or an edgemed ONNX directory")
    @click.option("--eval", "evals", required=True, help="comma-separated data files (MCQ JSONL, PubMedQA ori_pqal.json)")
    @click.option("--n", "counts", default=None,
                  help="items drawn (--seed) from each file: one count for all, or one per file (default: all)")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--records", required=True, type=click.Path(path_type=Path), help="per-item JSONL (resumes)")
    @click.option("--threads", type=int, default=2, show_default=True)
    @click.option("--n-ctx", type=int, default=2048, show_default=True)
    @click.option("--template", default="auto", show_default=True, help="auto, mcq or pubmedqa")
    @click.option("--max-gen-tokens", type=int, default=16, show_default=True)
    @click.option("--score", type=click.Choice(SCORES), default="both", show_default=True,
                  help="letter logits only, or also a parsed greedy answer")
    @click.option("--no-context", is_flag=True, help="PubMedQA without its abstract (question only)")
    @click.option("--quiet", is_flag=True, help="no progress bar")
    @click.option("--keep-replies", is_flag=True, help="write each generated reply's text into --records (made 0600)")
    def cli(artifact, evals, counts, seed, records, threads, n_ctx, template, max_gen_tokens, score, no_context, quiet,
            keep_replies):
        """Accuracy of one artifact on medical QA files; prints the summary as JSON."""
        from edgemed.benchmarks.harness.datasets import load_eval_set
        from edgemed.benchmarks.harness.scorer import open_scorer
        from edgemed.errors import EdgemedError

        try:
            files = [f for f in evals.split(",") if f]
            try:
                ns = [int(c) for c in counts.split(",")] if counts else [None]
            except ValueError:
                raise click.BadParameter(f"{counts!r} is not a count or comma-separated counts", param_hint="--n") from None
            items = load_eval_set(files, ns * len(files) if len(ns) == 1 else ns, seed, context=not no_context)
            with open_scorer(artifact, threads=threads, n_ctx=n_ctx) as scorer:
                out = evaluate(scorer, items, template=template, records_path=records, max_gen_tokens=max_gen_tokens,
                               score=score, progress=not quiet, keep_replies=keep_replies)
        except EdgemedError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(json.dumps(out, indent=2))

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cli.main(args=argv, standalone_mode=True)


if __name__ == "__main__":
    sys.exit(_main())
