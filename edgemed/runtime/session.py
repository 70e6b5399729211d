"""From a model file and a device profile to a loaded engine, and from a prompt to a reply.

``prepare`` chooses the profile (named or detected), plans memory from the
file's tensor table (refusing before anything loads when it cannot fit) and
returns the ``LoadSettings`` the profile prescribes. ``replies`` streams a
reply's text applying the think policy: capped thinking is closed with
``</think>`` and the answer is generated after it; an output constraint (JSON
schema, grammar) applies to the answer only, never to the thinking. ``respond``
splits it into ``(channel, text)`` pairs — ``think`` or ``answer`` (``run``,
``chat``); ``edgemed serve --think-cap`` runs ``replies`` over its batcher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from edgemed.devices.detect import resolve
from edgemed.runtime.chat_template import fold_system
from edgemed.runtime.plan import Plan, make_plan
from edgemed.formats.sniff import model_format
from edgemed.runtime.engine import Finish, GenerationSettings, LoadSettings
from edgemed.templates import Template
from edgemed.templates.contract import Parsed, choice_grammar
from edgemed.templates.think import CLOSE, OPEN, ThinkPolicy, ThinkSplitter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    plan: Plan | None         # None for formats the planner does not read (ONNX)
    load: LoadSettings
    profile: str


def load_settings(plan: Plan, seed: int = 0) -> LoadSettings:
    """The engine settings a plan prescribes."""
    s = plan.llama
    return LoadSettings(n_ctx=s["n_ctx"], n_threads=s["n_threads"], n_threads_batch=s["n_threads_batch"],
                        n_batch=s["n_batch"], n_ubatch=min(s["n_ubatch"], s["n_batch"]),
                        n_gpu_layers=s["n_gpu_layers"],  # -1: every layer
                        flash_attn=s["flash_attn"], type_k=s["type_k"], type_v=s["type_v"],
                        use_mmap=s["use_mmap"], use_mlock=s["use_mlock"], seed=seed,
                        extra_buffers=s.get("extra_buffers", "auto"))


def prepare(model: Path, profile_name: str | None = None, n_ctx: int | None = None, threads: int | None = None,
            seed: int = 0, root: Path | str = "/", adapters=(), prefix_cache: bool = False,
            prefix_cache_mib: int | None = None, slots: int = 1, batched: bool = False) -> Prepared:
    """Profile + memory plan + load settings for ``model`` on this machine (nothing is loaded); ``adapters``: the
    LoRA adapter files (or ``loader.AdapterSpec``) that will be applied, counted by the plan. ``prefix_cache``
    (``edgemed serve``): the plan also counts a host-RAM prefix cache of ``prefix_cache_mib`` MiB (None: the
    profile's, reduced to what fits; see ``plan.make_plan``); ``plan.estimate.prefix_cache`` is its size. ``slots``:
    the sequences that will share the context, each with its own KV stream (its share is padded apart); ``n_ctx``
    is the context of each (``serve --ctx``: per slot), so the load's context is ``n_ctx`` x ``slots``.
    ``batched``: the settings of ``edgemed serve``'s batcher, else those of the one-sequence engine (``run``,
    ``chat``: ``plan.for_engine``)."""
    from edgemed.runtime.plan import GPU_MEMORY_NOTE, check_threads

    check_threads(threads, "--threads")  # 0 would silently mean "the profile's", -3 would reach llama.cpp
    profile, facts = resolve(profile_name, root)
    if model_format(Path(model)) != "gguf":
        if adapters:
            from edgemed.errors import InputError

            raise InputError(f"LoRA adapters apply to GGUF models at run time; '{model}' is {model_format(Path(model))}.",
                             "merge the adapter into the ONNX export (`edgemed convert SOURCE --lora ADAPTER --to onnx`), "
                             "or run a GGUF base with --adapter")
        threads_ = threads or profile.threads(profile.onnx["intra_op_threads"], facts)
        load = LoadSettings(n_ctx=n_ctx or profile.llama["n_ctx"], n_threads=threads_, seed=seed,
                            providers=tuple(profile.onnx["providers"]))
        return Prepared(None, load, profile.name)
    plan = plan_load(model, profile, facts, n_ctx=n_ctx, adapters=adapters, prefix_cache=prefix_cache,
                     prefix_cache_mib=prefix_cache_mib, slots=slots, batched=batched)
    if plan.gpu_memory_unplanned:
        log.warning("%s", GPU_MEMORY_NOTE)
    load = load_settings(plan, seed)
    if threads:
        load = replace(load, n_threads=threads, n_threads_batch=threads)
    return Prepared(plan, load, profile.name)


def plan_load(model: Path, profile, facts, *, n_ctx: int | None = None, adapters=(), prefix_cache: bool = False,
              prefix_cache_mib: int | None = None, slots: int = 1, batched: bool = False, budget: int | None = None,
              here: bool = True) -> Plan:
    """The memory plan of a GGUF load, ``make_plan``'s arguments built in this one place for ``prepare`` (``run``,
    ``chat``, ``serve``) and ``edgemed plan``, so a plan cannot describe another load than the one made.

    ``n_ctx``: the context of each of the ``slots`` (``serve --ctx``, per slot; ``run --ctx`` with its one slot):
    the load's context is ``n_ctx`` x ``slots``, multiplied here and nowhere else (``make_plan`` takes the whole
    context, and names the per-slot value a refusal of it). ``prefix_cache`` and ``prefix_cache_mib``: ``serve
    --prefix-cache/--no-prefix-cache`` and ``--prefix-cache-mib`` (``check_prefix_cache``); ``batched``:
    ``serve``'s batcher. ``here``: the model loads on the machine ``facts`` describe, with the llama.cpp installed here
    (``plan.installed_build``); not ``here``: a plan for the device ``profile`` describes, with the build meant for it
    (``edgemed plan --profile``). ``budget``: bytes instead of the profile's (``plan --budget-mb``)."""
    from edgemed.runtime.plan import installed_build, prefix_cache_request

    check_prefix_cache(prefix_cache, prefix_cache_mib)
    cache = prefix_cache_request(profile, prefix_cache_mib) if prefix_cache else None
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (n_ctx, slots))
    total = n_ctx * slots if whole else n_ctx  # not whole numbers: to make_plan as given, which refuses them by name
    return make_plan(model, profile, facts, requested_ctx=total, budget=budget, adapters=adapters, prefix_cache=cache,
                     n_seq=slots, here=here, batched=batched, **(installed_build() if here else {}))


def check_prefix_cache(prefix_cache: bool, prefix_cache_mib: int | None) -> None:
    """Refuses ``--no-prefix-cache`` with a ``--prefix-cache-mib`` above 0: ``plan_load`` checks it, and ``edgemed
    serve`` calls it first, before it opens anything (a port, a bundle)."""
    if not prefix_cache and prefix_cache_mib:
        from edgemed.errors import InputError

        raise InputError(f"--no-prefix-cache and --prefix-cache-mib {prefix_cache_mib} contradict each other.",
                         "pass one of them (--no-prefix-cache turns all prompt reuse off)")


def open_with_adapters(model: Path, load: LoadSettings, adapters=()):
    """The engine for ``model`` (``engine.open_engine``), with LoRA ``adapters`` applied when there are any (GGUF
    only: ``prepare`` refused the others)."""
    if not adapters:
        from edgemed.runtime.engine import open_engine

        return open_engine(model, load)
    from edgemed.runtime.llama_engine import LlamaEngine

    return LlamaEngine(model, load, adapters)


def admit_adapter(plan: Plan, load: LoadSettings, served=(), added=None, finishing=()) -> None:
    """Before the LoRA adapter ``added`` (``loader.AdapterSpec``) joins ``served`` on a running server whose model
    was planned as ``plan`` and loaded with ``load``: the checks ``edgemed serve --adapter`` gets at start. Made for
    this base (``AdapterError``), fits the memory budget with what is loaded (``PlanError``), and the host
    self-test passes for the model with the whole set (``ModelLoadError`` on a native crash). Nothing is loaded.
    ``finishing``: adapters removed whose running requests keep them loaded; their tensors hold memory until those
    end, so the budget counts them beside ``served``, and the self-test's child applies them too (the set the new
    adapter joins is all that is loaded). A base file that no longer reads is ``loader.BaseUnreadable``: the
    server's, not the adapter's."""
    from edgemed.errors import PlanError
    from edgemed.runtime import selftest
    from edgemed.runtime.loader import check_adapter, loaded_base_metadata
    from edgemed.runtime.plan import MIB, adapter_room, adapters_bytes

    model = Path(plan.model)
    check_adapter(loaded_base_metadata(model, added.path), model, added.path)
    served, finishing = list(served), list(finishing)
    needed, budget = adapter_room(plan, [*served, *finishing], [added])
    if needed > budget:
        size = adapters_bytes([added])
        held = f"{len(served)} served adapters" + (f" and {len(finishing)} removed ones still loaded for their running "
                                                   "requests" if finishing else "")
        wait = "wait until GET /admin/adapters lists none under \"finishing\" (their memory is freed then), " \
            if finishing else ""
        raise PlanError(
            f"The adapter '{added.path.name}' ({size / MIB:.0f} MiB) would bring this server to {needed / MIB:.0f} MiB, "
            f"over the '{plan.profile}' budget of {budget / MIB:.0f} MiB (model, {plan.estimate.n_ctx}-token context, "
            f"prefix cache {plan.estimate.prefix_cache / MIB:.0f} MiB and {held}); "
            "it was not loaded and the server serves as before.",
            f"{wait}remove an adapter first (DELETE /admin/adapters/NAME), or restart edgemed serve with --adapter FILE "
            "(the plan then makes room for it) or with a smaller --ctx or --prefix-cache-mib")
    selftest.admit(model, load, [*served, *finishing, added])


#: what closes a thought (finished or capped) before the answer is asked for (``respond``; the accuracy harness's cue)
THOUGHT_CLOSING = "\n" + CLOSE + "\n\n"


def starts_in_think(prompt: str) -> bool:
    """Templates of some reasoning models open the think block themselves (``...<think>\\n``)."""
    return prompt.rstrip().endswith("<think>")


def generate(engine, prompt: str, settings: GenerationSettings, cut: list | None) -> Iterator[str]:
    """``engine.complete``'s pieces; with ``cut``, then appends whether the call stopped because it had sampled its
    ``max_tokens`` (the engine's ``Finish``: a text re-tokenized may count fewer tokens than were sampled, or more)."""
    stream = engine.complete(prompt, settings)
    try:
        finish = yield from stream
    finally:  # left unfinished (``respond`` drops a start it does not keep): the engine's sampler goes now
        getattr(stream, "close", lambda: None)()
    if cut is not None:
        if not isinstance(finish, Finish):
            raise TypeError(f"{type(engine).__name__}.complete returned no Finish: whether the text was cut is unknown")
        cut.append(finish.cut)


def thought_settings(settings: GenerationSettings, think: ThinkPolicy) -> GenerationSettings:
    """The settings of a capped thought: unconstrained, at most the cap (and ``max_tokens``), stopping at ``</think>``."""
    cap = min(think.cap or settings.max_tokens, settings.max_tokens)
    return replace(settings, max_tokens=cap, stop=(CLOSE,), json_schema=None, grammar=None)


def splits(prompt: str, settings: GenerationSettings, think: ThinkPolicy) -> bool:
    """Whether ``replies`` may make two calls (a thought, then its answer): a cap, or a constraint the answer alone
    follows after a thought the prompt opened. Otherwise it is one call with ``settings``."""
    constrained = bool(settings.json_schema or settings.grammar)
    return think.cap is not None or (constrained and starts_in_think(prompt))


def opening_settings(prompt: str, settings: GenerationSettings, think: ThinkPolicy) -> GenerationSettings:
    """The settings of ``replies``' first call (``edgemed serve`` queues it before the reply is read)."""
    if not splits(prompt, settings, think):
        return settings
    constrained = bool(settings.json_schema or settings.grammar)
    return thought_settings(settings, think) if starts_in_think(prompt) or constrained else settings


def replies(engine, prompt: str, settings: GenerationSettings, think: ThinkPolicy,
            cut: list | None = None) -> Iterator[str]:
    """The reply's text as the client reads it, under the think policy (see the module docstring): the model's
    pieces, and ``THOUGHT_CLOSING`` between a thought that was closed or capped and the answer asked for after it
    (a second ``engine.complete`` whose prompt is ``prompt`` + the thought + ``THOUGHT_CLOSING``). ``cut``: a list
    that gains, per generation call, whether it stopped at its token limit; its last entry says whether the answer
    was cut short. The cap applies to a thought only: a model that writes no ``<think>`` answers in one call, as with
    no cap."""
    if not splits(prompt, settings, think):
        yield from generate(engine, prompt, settings, cut)
        return

    # The thought: unconstrained, at most `cap` tokens, stopping at </think>.
    free = thought_settings(settings, think)
    first = ""
    if starts_in_think(prompt):
        for piece in generate(engine, prompt, free, cut):
            first += piece
            yield piece
    else:
        # Whether the model thinks shows in its first tokens: held back until they say. They are sampled as the call
        # they most likely start: a constrained one as a thought (an answer begun without one would have been sampled
        # unconstrained), any other as the answer (as with no cap). A start the model does not go on with is dropped
        # and the right call made from the prompt again (the engine's next call keeps the prompt's cells only).
        peek = opening_settings(prompt, settings, think)
        pieces = generate(engine, prompt, peek, cut)
        thinks = False
        for piece in pieces:
            first += piece
            head = first.lstrip()
            if head.startswith(OPEN) or (head and not OPEN.startswith(head)):
                thinks = head.startswith(OPEN)
                break
        wanted = free if thinks else settings
        if wanted != peek:
            pieces.close()
            first, pieces = "", generate(engine, prompt, wanted, cut)
        if first:
            yield first
        for piece in pieces:
            first += piece
            yield piece
        if not thinks:
            return
    # Close the thought (whether the model finished it or hit the cap) and ask for the answer.
    yield THOUGHT_CLOSING
    yield from generate(engine, prompt + first + THOUGHT_CLOSING, settings, cut)


def respond(engine, prompt: str, settings: GenerationSettings, think: ThinkPolicy,
            cut: list | None = None) -> Iterator[tuple[str, str]]:
    """Stream ``(channel, text)`` for a rendered ``prompt``: ``replies``' text, split into thinking and answer."""
    splitter = ThinkSplitter(in_think=starts_in_think(prompt))
    for piece in replies(engine, prompt, settings, think, cut):
        yield from splitter.feed(piece)
    yield from splitter.flush()


@dataclass
class Answer:
    """A template's outcome: the parsed value, the reply, the thinking, whether the answer had to be asked for, and
    why the template's system message went into the user message (``fold_system``; None: it did not)."""

    parsed: Parsed
    reply: str
    think: str
    forced: bool = False
    system_folded: str | None = None


def ask(engine, template: Template, inputs: dict, settings: GenerationSettings, think: ThinkPolicy,
        on_piece=None) -> Answer:
    """Render ``template`` with ``inputs`` through the model's chat template, generate, and parse the contract.

    A JSON contract is enforced while sampling where the engine supports grammars. When a choice
    contract's reply has no single clear answer line (none, lines that disagree, a choice only inferred, or a reply
    cut at ``max_tokens``), the model is asked once more for just the label, constrained
    to the choices (``forced``), so a small model still yields a usable, clearly marked answer. Any other contract's
    reply cut at ``max_tokens`` is not ok, its error saying so. Where the model's chat template takes no system role,
    the template's system message (its safety preamble, task and contract) goes before the question in the user
    message (``fold_system``), so the model still reads it.
    """
    contract = template.contract
    if contract.kind == "json" and getattr(engine, "supports_grammar", False):
        settings = replace(settings, json_schema=contract.json_schema())
    messages, folded = fold_system(engine.render_chat, template.messages(inputs))
    prompt = engine.render_chat(messages)
    parts = {"think": [], "answer": []}
    cut: list[bool] = []
    for channel, text in respond(engine, prompt, settings, think, cut):
        parts[channel].append(text)
        if on_piece:
            on_piece(channel, text)
    thought, reply = "".join(parts["think"]), "".join(parts["answer"])
    # a reply cut at max_tokens is no answer (its end may hold a correction): a choice is asked for again
    parsed = template.parse(reply, inputs, truncated=bool(cut) and cut[-1])
    choices = template.choices(inputs)
    if parsed.ok or contract.kind != "choice" or not getattr(engine, "supports_grammar", False):
        return Answer(parsed, reply, thought, system_folded=folded)
    opened = "" if starts_in_think(prompt) else OPEN
    so_far = prompt + ((opened + thought + CLOSE + "\n\n") if thought else "") + reply
    follow = replace(settings, max_tokens=8, grammar=choice_grammar(choices), json_schema=None, stop=())
    forced = "".join(engine.complete(so_far.rstrip() + f"\n{contract.label}: ", follow)).strip()
    parsed = Parsed(forced in choices, forced if forced in choices else None, reply, parsed.error)
    return Answer(parsed, reply, thought, forced=True, system_folded=folded)
