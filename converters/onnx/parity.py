"""Parity of an exported ONNX directory against its Hugging Face source.

Same prompts, same token ids, same metrics as the GGUF gate
(``edgemed.converters.quality.parity``): float32 ONNX must reach NMSE < 1e-4; int4 must
give finite logits and top-1 agreement >= ``parity.TOP1_GATE``; each has a bar on its KL divergence
(``parity.KLD_GATES``, under its ``GATE_TYPE`` key; decision 0022). Each prompt is run as one prefill with
an empty KV cache, which is the path every generation starts with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgemed.converters.quality.parity import ParityReport, compare, same_vocabulary, source_logits
from edgemed.converters.onnx.trace import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS
from edgemed.errors import InputError
from edgemed.formats import genai_config

GENAI_CONFIG = "genai_config.json"

# ONNX weight type -> the parity gate's output-type key (f32: the NMSE gate; int4: the quantized top-1 gate; each
# with its ``KLD_GATES`` bar)
GATE_TYPE = {"fp32": "f32", "int4": "int4"}


def engine_graph(directory: Path) -> Path:
    """The graph edgemed's ONNX engine runs for ``directory``: the file its ``genai_config.json`` names
    (``model.decoder.filename``), the config read as the engine reads it. A folder without that file is refused, as
    the engine refuses it: what ``check`` gates is what a device runs, not whatever ``model.onnx`` lies beside it."""
    from edgemed.errors import InputError

    directory = Path(directory)
    config = directory / GENAI_CONFIG
    if not os.path.lexists(config):
        raise InputError(f"'{directory}' is a folder without {GENAI_CONFIG}, which names the graph edgemed's ONNX engine "
                         "runs: neither a GGUF nor an ONNX directory it can run.",
                         "pass a .gguf, or the directory `edgemed convert --to onnx` wrote")
    name = genai_config.read_model(config, engine=True)["decoder"]["filename"]
    if not (directory / name).is_file():
        raise InputError(f"'{config}' names the graph '{name}', which is not a file in '{directory}'.",
                         "re-copy the whole directory, or convert the model again")
    return directory / name


#: onnxruntime's refusal is one line, a few hundred characters; kept whole up to this, never cut at a word
MAX_SAID = 2000


class GraphNotOpened(InputError):
    """ONNX Runtime refused to open a graph. ``said`` is its message, the graph's folder left out: a conversion's
    graph sits in a temporary folder the user never sees, and the conversion says whose graph it was."""

    def __init__(self, problem: str, fix: str, said: str):
        super().__init__(problem, fix)
        self.said = said


def _said(exc: Exception, model_path: Path) -> str:
    said = " ".join(str(exc).split()).replace(str(model_path), Path(model_path).name)
    return said if len(said) <= MAX_SAID else said[:MAX_SAID].rsplit(" ", 1)[0] + " ..."


def onnx_logits(model_path: Path, token_lists: list[list[int]], threads: int | None = None) -> list:
    """float32 logits [positions, vocab] per token list, from an ONNX graph with a KV cache. A graph ONNX Runtime
    cannot open (truncated weights, a missing data file), a graph without past_key_values inputs, or a
    ``genai_config.json`` the ONNX engine would refuse (``edgemed.formats.genai_config``) is an ``InputError`` naming
    the file."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for a damaged model
        said = _said(exc, model_path)
        raise GraphNotOpened(f"ONNX Runtime cannot open '{model_path}': {said}",
                             "convert again, or re-copy the whole directory (the graph and its .data file)", said) from None
    names = {i.name for i in session.get_inputs()}
    config = Path(model_path).parent / GENAI_CONFIG
    # checked as the ONNX engine checks it: a regular file of bounded size, its sizes positive integers
    decoder = genai_config.read_model(config, engine=True)["decoder"] if os.path.lexists(config) else None
    past = [n for n in sorted(names) if n.startswith("past_key_values.")]
    if not past:
        raise InputError(f"The ONNX graph '{model_path}' has no past_key_values inputs: it is not a decoder with a KV "
                         "cache, which edgemed exports and checks.",
                         "check the directory `edgemed convert --to onnx` wrote, or convert the model again")
    if decoder:  # the KV shape from the config: a graph may leave head_dim symbolic
        kv_heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
    else:
        shape = next(i.shape for i in session.get_inputs() if i.name == past[0])
        kv_heads, head_dim = shape[1], shape[3]
        if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
            raise InputError(f"The ONNX graph '{model_path}' leaves its KV shape symbolic ({shape}), and its folder has "
                             f"no {GENAI_CONFIG} to give it.",
                             f"re-copy {GENAI_CONFIG} from the converted directory, or convert the model again")
    out = []
    for tokens in token_lists:
        n = len(tokens)
        feeds = {
            INPUT_IDS: np.array([tokens], dtype=np.int64),
            ATTENTION_MASK: np.ones((1, n), dtype=np.int64),
            POSITION_IDS: np.arange(n, dtype=np.int64)[None, :],
        }
        feeds = {k: v for k, v in feeds.items() if k in names}  # graphs that derive positions from the mask lack position_ids
        for name in past:  # [batch, kv_heads, past, head_dim] with past = 0
            feeds[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        logits = session.run([LOGITS], feeds)[0]
        out.append(np.asarray(logits[0], dtype=np.float32))
    del session
    return out


def check_onnx(source, onnx_path: Path, weight_type: str, *, threads: int | None = None,
               reference: tuple | None = None) -> ParityReport:
    """Parity of ``onnx_path`` against its HF ``source`` (the command's opened ``Source``: checkpoint + PEFT adapter,
    unmerged; as ``parity.source_logits`` takes it). ``reference`` reuses (ids, logits)."""
    ids, src = reference or source_logits(source)
    converted = onnx_logits(onnx_path, ids, threads)
    same_vocabulary(Path(onnx_path).parent, source, src, converted)
    return compare("onnx", GATE_TYPE.get(weight_type, weight_type), ids, src, converted)


def verify_tokenizer(source_dir: Path, onnx_dir: Path, samples=None) -> int:
    """Tokenize ``samples`` (the GGUF check's medical sentences) with the source's Hugging Face tokenizer and with the
    directory's ``tokenizer.json`` as the ONNX engine reads it (``tokenizers``, no special tokens added); raise on
    the first difference. Parity feeds both models the source's token ids, so a directory whose tokenizer splits
    text otherwise would pass it and answer garbage to what a clinician types. Returns the tokens compared."""
    import tokenizers

    from edgemed.converters.gguf.tokenizer import MEDICAL_SAMPLES
    from edgemed.converters.source.checkpoint import hf_tokenizer
    from edgemed.errors import TokenizerError
    from edgemed.formats.input_file import read_at_most
    from edgemed.runtime.onnx_engine import MAX_TOKENIZER_BYTES

    path = Path(onnx_dir) / "tokenizer.json"
    fix = (f"convert again; if '{path}' is the checkpoint's own file, transformers builds the source's tokenizer "
           "otherwise than that file says (its class, from tokenizer_config.json or the model_type, brings its own "
           "pre-tokenizer): fix the checkpoint's tokenizer files so both split text alike")
    try:
        theirs = tokenizers.Tokenizer.from_str(read_at_most(path, MAX_TOKENIZER_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"'{onnx_dir}' has no tokenizer.json, which the ONNX engine tokenizes with.", fix) from None
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own types for a bad file; read_at_most an InputError
        problem = getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}"
        raise TokenizerError(f"The tokenizer in '{path}' cannot be read: {problem}", fix) from None
    ours = hf_tokenizer(source_dir)
    compared = 0
    for text in samples or MEDICAL_SAMPLES:
        want = ours(text, add_special_tokens=False)["input_ids"]
        got = theirs.encode(text, add_special_tokens=False).ids
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise TokenizerError(
                f"'{path}' tokenizes differently from the source's tokenizer at token {at} of {text[:60]!r}: "
                f"source {want[at:at + 5]} vs the directory {got[at:at + 5]}.", fix)
        compared += len(want)
    return compared


def weight_type_of(path: Path, report: dict | None) -> str:
    """The weight type of the ONNX graph at ``path``, read from it (int4: ``MatMulNBits`` nodes; else fp32), which
    chooses the gate (fp32: NMSE; int4: top-1 agreement; each its KLD bar); its directory's conversion ``report``
    saying otherwise is refused rather than let choose the looser gate."""
    import onnx

    from edgemed.errors import InputError

    path = Path(path)
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own types for a damaged file
        raise InputError(f"'{path}' is not a readable ONNX graph ({type(exc).__name__}: {str(exc)[:120]}).",
                         "convert again, or re-copy the directory") from None
    found = "int4" if any(n.op_type == "MatMulNBits" for n in graph.graph.node) else "fp32"
    stated = (report or {}).get("weight_type")
    if stated is not None and stated != found:
        raise InputError(f"'{path.parent}/report.json' says weight_type {json.dumps(stated)[:40]}, but the graph is {found} "
                         "(MatMulNBits nodes make it int4): the report is not this graph's, so neither gate can be "
                         "chosen from it.", "convert again, or remove report.json to check the graph as it is")
    return found
