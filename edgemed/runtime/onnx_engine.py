"""ONNX engine on onnxruntime: owns one ``InferenceSession`` over a directory written by ``convert --to onnx``.

The directory is self-describing: ``genai_config.json`` (onnxruntime-genai's
format) names the graph file, its inputs and outputs, the layer shapes, the
context length and the stop tokens; ``tokenizer.json`` is read with the
``tokenizers`` library; the chat template is rendered in a Jinja sandbox.
No torch, no transformers, no converters: a device installs ``edgemed[onnx]``.

Decoding keeps the KV cache as ORT values between steps: the prompt is run
once (prefill, past length 0), then each new token is one step whose
``present`` outputs become the next step's ``past`` inputs.

Execution providers come from ``LoadSettings.providers`` (short names
from ``PROVIDERS`` or ORT's own names, in order of preference), so a device
profile can ask for TensorRT then CUDA on a Jetson; CPU is always the fallback.
What the session took is read back: its providers (``session.get_providers()``:
onnxruntime drops one whose libraries do not load, with a line in its own log
only) and the intra-op threads it started (counted in ``/proc/self/task``: its
options read back the values set, not what it made of them); a difference is said at
WARNING, as a llama.cpp load says weights placed elsewhere than asked. The graph
runs in onnxruntime's sequential mode, with no inter-op threads
(``OnnxEngine._thread_options`` says why; a profile that asks for more gets 1, with a warning).

Everything onnxruntime would trip on later is refused at load with the fix: a
graph or weights file that is not a regular file inside the folder, names or
KV shapes the graph does not have, a tokenizer with ids past the graph's logits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Generator, Iterator

from edgemed import env
from edgemed.errors import InputError, ModelLoadError, require
from edgemed.formats import genai_config, onnx_external
from edgemed.formats.input_file import read_at_most
from edgemed.formats.nesting import loads_json
from edgemed.runtime.engine import Finish, GenerationSettings, LoadSettings, check_fits

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
# Short names device profiles use -> onnxruntime execution provider names.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
# ORT tensor type -> numpy dtype name, for the empty past fed at prefill
_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


#: a tokenizer.json is megabytes; its side files kilobytes: anything larger is not one
MAX_TOKENIZER_BYTES = 64 << 20
_RECOPY = "re-copy the model directory; the file is corrupt"


def _read_text(path: Path, limit: int = MAX_TOKENIZER_BYTES) -> str:
    """A file of the model directory: a regular file (a FIFO would hang the load), at most ``limit`` bytes, UTF-8."""
    try:
        return read_at_most(path, limit).decode("utf-8")
    except FileNotFoundError:
        raise
    except OSError as exc:  # NotRegular says which kind of file it is
        raise ModelLoadError(f"'{path}' cannot be read ({exc.strerror or exc}).", _RECOPY) from None
    except ValueError as exc:  # too large, or not UTF-8
        raise ModelLoadError(f"'{path}' cannot be read ({exc}).", _RECOPY) from None


def _read_json(path: Path) -> dict:
    try:
        doc = loads_json(_read_text(path))
    except FileNotFoundError:
        return {}
    except ValueError as exc:  # JSONDecodeError and TooDeep
        raise ModelLoadError(f"'{path}' is not valid JSON ({exc}).", _RECOPY) from None
    if not isinstance(doc, dict):
        raise ModelLoadError(f"'{path}' is not a JSON object.", _RECOPY)
    return doc


def choose_providers(requested, available: list[str]) -> list[str]:
    """The requested providers this onnxruntime build has, in order, then CPU."""
    names = [PROVIDERS.get(str(p).lower(), str(p)) for p in (requested or ["cpu"])]
    chosen = [n for n in dict.fromkeys(names) if n in available]
    missing = [n for n in names if n not in available]
    if missing:
        log.warning("execution provider(s) %s not in this onnxruntime build (has: %s)", ", ".join(missing), ", ".join(available))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _dims(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _token_ids(value, where: Path) -> set[int]:
    """``eos_token_id``: an id or a list of ids (or absent)."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids):
        raise ModelLoadError(f"'{where}': eos_token_id must be a token id or a list of them, not {str(value)[:40]}.", _RECOPY)
    return set(ids)


def os_threads() -> int | None:
    """The threads of this process, as Linux lists them (``/proc/self/task``); None where that cannot be read."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _ort_errors(ort) -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception types (Fail, InvalidArgument, RuntimeException, ...): what a run raises when the
    graph cannot compute the step it was fed."""
    native = vars(ort.capi.onnxruntime_pybind11_state)
    return tuple(v for v in native.values() if isinstance(v, type) and issubclass(v, Exception))


_EXTERNAL_FIX = onnx_external.FIX
#: the words of onnxruntime's refusals of external data: "external data", "External initializer: X offset: ... out
#: of bounds", "... data file ... does not exist"
_EXTERNAL_WORDS = ("external data", "external initializer", "data file")


def _load_failed(graph: Path, exc: Exception) -> ModelLoadError:
    """onnxruntime's refusal of ``graph`` as one paragraph; its external-data refusals name that fix. A message it
    does not recognise gets the fix of a folder that is not what a conversion wrote, and no guess at its cause."""
    said = str(exc).strip()
    if any(words in said.lower() for words in _EXTERNAL_WORDS):
        return ModelLoadError(f"onnxruntime refused the external data (the weights file) that '{graph}' names: "
                              f"{said}.", _EXTERNAL_FIX)
    return ModelLoadError(f"onnxruntime could not load '{graph}': {said}.",
                          "re-copy the model directory whole (the graph, its .data file and genai_config.json), or "
                          "convert the model again with `edgemed convert --to onnx`")


class OnnxEngine:
    """One loaded ONNX model directory."""

    supports_grammar = False  # json_schema / grammar settings are not enforced by this backend
    prefix_reuse = False  # every call computes its whole prompt

    def __init__(self, path: Path, load: LoadSettings):
        env.enforce_offline()
        ort = require("onnxruntime", "onnx")
        self.np = require("numpy", "onnx")
        tokenizers = require("tokenizers", "onnx")
        self.path = path
        if not os.path.lexists(path / GENAI_CONFIG):
            raise ModelLoadError(f"'{path}' has no {GENAI_CONFIG}.", "convert the model with `edgemed convert --to onnx`, which writes it")
        try:  # untrusted: every field the engine reads or sizes from is checked first
            model = genai_config.read_model(path / GENAI_CONFIG, engine=True)
        except InputError as exc:
            raise ModelLoadError(exc.problem, exc.fix) from None
        dec = model["decoder"]
        self.n_layers = int(dec["num_hidden_layers"])
        self.names = dec["inputs"] | dec["outputs"]
        self.n_ctx_train = int(model.get("context_length") or 0) or None  # the context the model was trained on
        self.n_ctx = min(int(load.n_ctx), self.n_ctx_train or int(load.n_ctx))
        self.eos_ids = _token_ids(model.get("eos_token_id"), path / GENAI_CONFIG)
        self.eos_ids |= _token_ids(_read_json(path / "generation_config.json").get("eos_token_id"),
                                   path / "generation_config.json")

        try:
            text = _read_text(path / "tokenizer.json")
        except FileNotFoundError:
            raise ModelLoadError(f"'{path}' has no tokenizer.json.", "re-copy tokenizer.json from the converted directory") from None
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own exception type
            raise ModelLoadError(f"Cannot read the tokenizer in '{path}': {exc}.", "re-copy tokenizer.json from the converted directory") from None
        tok_cfg = _read_json(path / "tokenizer_config.json")
        self.bos_token, self.eos_token = _token_text(tok_cfg.get("bos_token")), _token_text(tok_cfg.get("eos_token"))
        self.chat_template = self._load_template(tok_cfg)

        graph = path / dec["filename"]
        self._check_external_data(graph)  # before onnxruntime opens anything: a FIFO would hang the load
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self._thread_options(ort, opts, load)
        if load.extra.get("profile"):
            opts.enable_profiling = True
            opts.profile_file_prefix = str(load.extra["profile"])
        asked = choose_providers(load.providers, ort.get_available_providers())
        before = os_threads()
        try:
            self.session = ort.InferenceSession(str(graph), opts, providers=asked)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise _load_failed(graph, exc) from None
        self.providers = list(self.session.get_providers())  # what onnxruntime took, not what it was asked for
        self._read_back(asked, threads, before)
        self.ort = ort
        self._ort_errors = _ort_errors(ort)
        self._past_specs = []
        for i in range(self.n_layers):
            for key in ("past_key_names", "past_value_names"):
                self._past_specs.append(self.names[key] % i)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        self._check_names(dec["filename"], set(inputs), set(outputs))
        spec = inputs[self._past_specs[0]]
        # [batch, kv_heads, past, head_dim]; taken from the config (a graph may name the last axis symbolically),
        # held to the graph's concrete dims
        self._kv = (int(dec["num_key_value_heads"]), int(dec["head_size"]), _NP_TYPES.get(spec.type, "float32"))
        self._check_shapes(dec["filename"], inputs, outputs[self.names["logits"]], model.get("vocab_size"))
        self._outputs = [self.names["logits"]] + [
            self.names[key] % i for i in range(self.n_layers) for key in ("present_key_names", "present_value_names")]

    def _check_external_data(self, graph: Path) -> None:
        """Refuse, before onnxruntime opens anything, a graph file that is not a regular file (a FIFO would hang the
        load: onnxruntime opens it blocking) and external data onnxruntime must not be handed
        (``onnx_external.refusal``: a location that is not a regular file inside the folder, an offset or length past
        the end of its file). onnxruntime 1.32 refuses these with a message about its own code; older releases read
        what they were pointed at."""
        try:
            tensors = onnx_external.external_tensors(graph)
        except FileNotFoundError:
            raise ModelLoadError(f"'{self.path}' has no '{graph.name}' (the graph {GENAI_CONFIG} names).",
                                 "re-copy the model directory, or convert the model again with "
                                 "`edgemed convert --to onnx`") from None
        except OSError as exc:  # NotRegular says which kind of file it is; a folder is IsADirectoryError
            raise ModelLoadError(f"'{graph}' cannot be read ({exc.strerror or exc}).", _RECOPY) from None
        except ValueError as exc:
            raise ModelLoadError(f"'{graph}' is not an ONNX graph onnxruntime could load ({exc}).", _RECOPY) from None
        try:
            why = onnx_external.refusal(self.path, tensors)
        except OSError as exc:  # changed while it was looked at
            raise ModelLoadError(f"The external data of '{graph}' cannot be read ({exc.strerror or exc}).", _RECOPY) from None
        if why:
            raise ModelLoadError(f"'{graph}' {why}", _EXTERNAL_FIX)

    def _thread_options(self, ort, opts, load: LoadSettings) -> dict[str, int]:
        """Set the session's threads; the counts set, by option name (unset: onnxruntime's default).

        The graph runs in onnxruntime's sequential mode, where a node's work is split over the intra-op threads
        (``n_threads``). Inter-op threads run only in its parallel mode, which runs independent nodes at once: a
        decoder is a chain of layers with few branches, and onnxruntime's own tuning notes say parallel mode can
        hurt such a graph. Measured on a 4-layer, 896-wide int4 Qwen2 decoder (2 cores), a decode step took
        6.1 ms sequential with 2 intra-op threads, 20.8 ms parallel with 2 + 2 and 13.1 ms with 1 + 2 (medians of
        5 rounds of 64 steps). So a device profile's ``onnx.inter_op_threads`` above 1 is used as 1, with a
        warning when the profile is read (``devices.schema.inert``), and no load asks for inter-op threads."""
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        threads = {}
        if load.n_threads:
            threads["intra_op_num_threads"] = opts.intra_op_num_threads = int(load.n_threads)
        return threads

    def _read_back(self, asked: list[str], threads: dict[str, int], before: int | None) -> None:
        """Say at WARNING where the session differs from what it was asked: an execution provider onnxruntime did not
        take (a CUDA or TensorRT build whose libraries, cuDNN or driver do not load falls back to the next provider,
        saying so only in its own log), or an intra-op pool of another size than was set. The pool is measured, not
        asked about: ``get_session_options()`` reads back the values that were set, whatever the session made of
        them (an inter-op count in sequential mode read back as set and started no thread), while the threads the
        process gained while the session was made (``/proc/self/task``; a pool of n is the calling thread and n - 1
        new ones) are what onnxruntime started. The load goes on, as a llama.cpp load whose GPU layers cannot be
        offloaded runs on the CPU: the answers are the same, slower."""
        dropped = [p for p in asked if p not in self.providers]
        if dropped:
            log.warning("onnxruntime did not take the execution provider(s) %s asked for %s: it runs on %s, slower. "
                        "Fix: make the provider's libraries loadable here (for CUDA: onnxruntime-gpu with the CUDA "
                        "and cuDNN it was built for; onnxruntime's own log names what failed), or list only the "
                        "providers this machine has in the profile's onnx.providers.",
                        ", ".join(dropped), self.path.name, ", ".join(self.providers) or "nothing")
        if not threads:
            return
        after = os_threads()
        if before is None or after is None:
            log.info("the thread count of onnxruntime's session for %s could not be read back (this system has no "
                     "/proc/self/task): %s was set, not checked.", self.path.name,
                     ", ".join(f"{name} {n}" for name, n in threads.items()))
            return
        made, want = after - before, sum(n - 1 for n in threads.values())
        # another provider (CUDA) starts threads of its own: there, only a pool smaller than asked is a difference
        if made < want or (made != want and self.providers == ["CPUExecutionProvider"]):
            log.warning("onnxruntime's session for %s did not take edgemed's thread settings: %s should start %d "
                        "thread(s), and the process gained %d while it loaded (/proc/self/task). Fix: check that "
                        "this onnxruntime build uses its own thread pool (an OpenMP build takes OMP_NUM_THREADS "
                        "instead), or set the count with --threads.", self.path.name,
                        ", ".join(f"{name} {n}" for name, n in threads.items()), want, made)

    def _check_shapes(self, filename: str, inputs: dict, logits, vocab_size) -> None:
        """Refuse a config whose sizes are not the graph's, and a tokenizer with ids the graph has no row for:
        onnxruntime would fail at the first prompt (the empty past cache is sized from the config: "Got invalid
        dimensions for input"; a token id past the embedding: "Gather ... indices element out of data bounds")."""
        kv_heads, head_dim, _ = self._kv
        for name in self._past_specs:
            shape = list(inputs[name].shape)
            if len(shape) != 4:
                wrong = [f"it has {len(shape)} axes, not 4 (batch, num_key_value_heads, past, head_size)"]
            else:
                wrong = [f"axis {axis} is {shape[axis]}, not {want} ({field})"
                         for axis, want, field in ((1, kv_heads, "num_key_value_heads"), (3, head_dim, "head_size"))
                         if isinstance(shape[axis], int) and shape[axis] != want]
            if wrong:
                raise ModelLoadError(
                    f"'{self.path / GENAI_CONFIG}' does not describe the graph '{filename}': its input {name} is "
                    f"{_dims(shape)}, and {'; '.join(wrong)}.",
                    "re-copy genai_config.json and the graph from the same converted directory, or convert the model "
                    "again with `edgemed convert --to onnx`")
        dims = list(logits.shape)
        if dims and isinstance(dims[-1], int):
            rows, where = dims[-1], f"the last axis of its output {logits.name} {_dims(dims)}"
        elif vocab_size:  # a graph that names the axis: the config's count
            rows, where = int(vocab_size), f"vocab_size in {GENAI_CONFIG}"
        else:
            return
        top = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= rows:
            raise ModelLoadError(
                f"The tokenizer in '{self.path}' has token id {top}, but the graph '{filename}' scores only {rows} "
                f"tokens ({where}): a prompt holding that token would fail in onnxruntime.",
                "re-copy tokenizer.json from the converted directory (a token added after the conversion needs the "
                "model converted again with it, `edgemed convert --to onnx`)")

    def _check_names(self, filename: str, graph_inputs: set[str], graph_outputs: set[str]) -> None:
        """Refuse a genai_config.json whose names are not the graph's: onnxruntime would fail on the first prompt
        with an InvalidArgument traceback (a layer count one off: a past input never fed, or one the graph lacks)."""
        fed = {self.names["input_ids"], self.names["attention_mask"], *self._past_specs}
        if "position_ids" in self.names:
            fed.add(self.names["position_ids"])
        wanted = {self.names["logits"]} | {self.names[key] % i for i in range(self.n_layers)
                                          for key in ("present_key_names", "present_value_names")}
        gaps = [("input(s) the graph lacks", sorted(fed - graph_inputs)),
                ("graph input(s) it does not name", sorted(graph_inputs - fed)),
                ("output(s) the graph lacks", sorted(wanted - graph_outputs))]
        said = "; ".join(f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}" for what, names in gaps if names)
        if said:
            raise ModelLoadError(
                f"'{self.path / GENAI_CONFIG}' does not describe the graph '{filename}' (it says "
                f"num_hidden_layers {self.n_layers}); {said}.",
                "re-copy genai_config.json and the graph from the same converted directory, or convert the model again "
                "with `edgemed convert --to onnx`")

    def _load_template(self, tok_cfg: dict) -> str | None:
        file = self.path / "chat_template.jinja"
        if os.path.lexists(file):
            return _read_text(file)
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise ModelLoadError(f"'{self.path / 'tokenizer_config.json'}': chat_template is not text.", _RECOPY)
        return template

    # -- text -----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def markup_texts(self) -> frozenset[str]:
        """The added tokens the tokenizer matches in any text that are markup: the special ones, and those the chat
        template is written with (``chat_template.refuse_markup``; llama.cpp's ``Model.markup_texts`` likewise)."""
        template = self.chat_template or ""
        return frozenset(t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                         if t.content and (t.special or t.content in template))

    def render_chat(self, messages: list[dict]) -> str:
        from edgemed.runtime.chat_template import refuse_markup, render

        if not self.chat_template:
            raise ModelLoadError(f"'{self.path}' has no chat template.", "use --raw for raw completion, or convert with the tokenizer's chat template")
        refuse_markup(messages, self.markup_texts())
        return render(self.chat_template, messages, bos_token=self.bos_token, eos_token=self.eos_token)

    # -- generation -----------------------------------------------------------------------
    def chat(self, messages: list[dict], settings: GenerationSettings) -> Generator[str, None, Finish]:
        return self.generate(self.tokenize(self.render_chat(messages)), settings)

    def complete(self, prompt: str, settings: GenerationSettings) -> Generator[str, None, Finish]:
        return self.generate(self.tokenize(prompt, add_special=True), settings)

    def _check_fits(self, n_prompt: int, s: GenerationSettings) -> None:
        check_fits(n_prompt, s, self.n_ctx)

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Generator[str, None, Finish]:
        """Stream the text of up to ``settings.max_tokens`` new tokens after ``prompt_ids``; returns how it ended
        (``Finish``), as ``llamacpp.generate`` does."""
        self._check_fits(len(prompt_ids), settings)  # raised here, before the first next()
        return self._stream(list(prompt_ids), settings)

    def _stream(self, prompt_ids: list[int], settings: GenerationSettings) -> Generator[str, None, Finish]:
        from edgemed.runtime.text_stream import TextStream

        text = TextStream(self.detokenize, settings.stop)
        tokens = self.generate_tokens(prompt_ids, settings)
        try:
            for token in tokens:
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    return Finish("stop", len(text.ids))
            tail = text.flush()
            if tail:
                yield tail
        finally:
            tokens.close()
        # generate_tokens ends before max_tokens only at a stop token
        return Finish("length" if len(text.ids) >= settings.max_tokens else "eog", len(text.ids))

    def generate_tokens(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[int]:
        """New token ids after ``prompt_ids``: at most ``max_tokens``, ending before a stop token."""
        from edgemed.runtime.sampling import Sampler

        sampler = Sampler(settings)
        history = list(prompt_ids)
        steps = self.decode_steps(prompt_ids)
        try:
            logits = next(steps)
            for i in range(settings.max_tokens):
                token = sampler.pick(logits, history)
                if token in self.eos_ids:
                    return
                history.append(token)
                yield token
                if i < settings.max_tokens - 1:
                    logits = steps.send(token)
        finally:
            steps.close()

    def empty_past(self) -> dict:
        """An empty KV cache (past length 0) as ORT values, keyed by the graph's past input names."""
        np, ort = self.np, self.ort
        kv_heads, head_dim, dtype = self._kv
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv_heads, 0, head_dim), dtype=dtype))
        return {name: empty for name in self._past_specs}

    def forward(self, ids: list[int], past: dict, pos: int):
        """Run ``ids`` after ``pos`` cached positions: (logits numpy [len(ids), vocab], the new cache).

        The cache is a dict of ORT values ``[1, kv_heads, pos, head_dim]``; it is never copied to numpy here.
        """
        np, ort = self.np, self.ort
        ids = np.asarray([ids], dtype=np.int64)
        n = ids.shape[1]
        feeds = {
            self.names["input_ids"]: ort.OrtValue.ortvalue_from_numpy(ids),
            self.names["attention_mask"]: ort.OrtValue.ortvalue_from_numpy(np.ones((1, pos + n), dtype=np.int64)),
            **past,
        }
        if "position_ids" in self.names:
            positions = np.arange(pos, pos + n, dtype=np.int64)[None, :]
            feeds[self.names["position_ids"]] = ort.OrtValue.ortvalue_from_numpy(positions)
        try:
            outs = self.session.run_with_ort_values(self._outputs, feeds)
        except self._ort_errors as exc:
            raise ModelLoadError(
                f"onnxruntime could not run the graph of '{self.path}' on {n} token(s) after {pos} cached "
                f"position(s): {str(exc).strip()}.",
                "re-copy the model directory, or convert the model again with `edgemed convert --to onnx`; if the "
                "error persists with a fresh conversion, report it with this message") from None
        return outs[0].numpy()[0], dict(zip(self._past_specs, outs[1:]))

    def decode_steps(self, prompt_ids: list[int]):
        """A generator of next-token logits (numpy [vocab]): first after the prompt, then after each token sent in.

        ``logits = next(steps)`` runs the prefill; ``logits = steps.send(token)``
        runs one decode step. The KV cache stays inside as ORT values.
        """
        past, pos, ids = self.empty_past(), 0, list(prompt_ids)
        while True:
            logits, past = self.forward(ids, past, pos)
            pos += len(ids)
            token = yield logits[-1]
            ids = [token]

    def close(self) -> None:
        session, self.session = getattr(self, "session", None), None
        if session is not None and self.ort is not None and session.get_session_options().enable_profiling:
            log.info("onnxruntime profile written to %s", session.end_profiling())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path: Path, settings: LoadSettings) -> OnnxEngine:
    return OnnxEngine(path, settings)
