"""How far a quantized artifact's next-token distributions drift from the F16 reference on medical text.

``reference_logits(scorer, out_path)`` runs the reference artifact (F16) over fixed medical passages
(``data/medical_text.txt``, one passage per paragraph, each evaluated from an empty cache in one batch) and saves,
per position, the **top-k log-probabilities with their token ids and the log of the remaining tail mass**
(``.npz``, 32 KB a position at k = 4096 — 45 MB for the shipped passages — vs 300 KB for a full 151,936-entry
float16 row).
``divergence(scorer, reference_path)`` runs the same passages through another artifact, refuses if its tokenizer
gives different token ids, and reports per-position KL(reference || artifact) in nats (mean and 99th percentile),
top-1 agreement (the artifact's argmax equals the reference's) and the number of positions, by the rules of
``edgemed.converters.quality.fidelity``: the headline leaves out each passage's first position, which is reported on its own
(``first``), beside the llama.cpp-compatible figure (``llamacpp``: the second half of each passage) and every
position (``all``).

**Whose reference.** The bench writes its result key into the reference (``key``: the reference artifact's sha256,
runtime build, profile, settings; ``reference_key`` reads it back) and ``divergence`` refuses one written under another
key than the caller expects: a reference left from an earlier F16 (its re-measure failed) never stands in for the
current one.

**The approximation.** The stored reference is the distribution coarse-grained to k+1 outcomes: the top-k tokens
one by one and "any other token" lumped together; the artifact's distribution is coarse-grained the same way
(its probabilities on the same k ids, and the rest). The KL between coarse-grainings is a lower bound on the true
KL (log-sum inequality) and the gap is the KL hidden inside the tail, at most the tail's share of the reference
mass times the log-ratio spread within it. ``tail_mass_mean`` is reported so the bound can be judged. Measured on
Qwen2.5-0.5B Q4_K_M vs F16 (453 positions), against the full-vocabulary KLD: -9.5 % at k = 256, -4.4 % at 1024,
-1.7 % at 4096 (the default), -0.5 % at 16384.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

from edgemed.errors import InputError
from edgemed.converters.quality.fidelity import log_softmax as _log_softmax, summarize

log = logging.getLogger(__name__)

TOP_K = 4096  # KLD gap vs full vocabulary: -9.5 % at 256, -4.4 % at 1024, -1.7 % at 4096 (Qwen2.5-0.5B Q4_K_M)
FORMAT = "edgemed.divergence-reference/1"


def load_texts(path: Path | None = None) -> list[str]:
    """Passages of ``path`` (default: the shipped medical text): paragraphs separated by blank lines, '#' comments."""
    text = Path(path).read_text(encoding="utf-8") if path else \
        (resources.files("edgemed.benchmarks.harness") / "data" / "medical_text.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return [" ".join(p.split()) for p in "\n".join(lines).split("\n\n") if p.strip()]


def _tail_logmass(logp, ids):
    """log of the probability mass outside ``ids`` per row (``logp`` [n, vocab], ``ids`` [n, k])."""
    import numpy as np

    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, axis=1)
    top = rest.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.exp(rest - top).sum(axis=1)) + top[:, 0]
    return np.where(np.isfinite(out), out, -np.inf)


def _passages(scorer, texts: list[str]) -> list[list[int]]:
    """The token ids of ``texts``; refused, before any is measured, where some do not fit the scorer's context (each
    is evaluated whole: its tokens and the next position), naming them and the context that holds them all."""
    from edgemed.errors import ContextOverflow

    tokens = [scorer.tokenize(t, special=True) for t in texts]
    over = {i: len(t) + 1 for i, t in enumerate(tokens, 1) if len(t) + 1 > scorer.n_ctx}
    if over:
        longest = max(over.values())
        named = ", ".join(f"passage {i} needs {n}" for i, n in sorted(over.items(), key=lambda kv: -kv[1])[:5])
        more = f", and {len(over) - 5} more" if len(over) > 5 else ""
        wider = scorer.wider_context(longest)
        raise ContextOverflow(
            f"{len(over)} of the {len(tokens)} divergence passages need more positions than "
            f"{scorer.context_words('divergence')}: {named}{more}; none was measured.",
            wider or f"the model was trained on {scorer.n_ctx_train} tokens, fewer than the {longest} positions the "
                     "longest passage needs: leave divergence out of --phases")
    return tokens


def reference_logits(scorer, out_path: Path, texts: list[str] | None = None, *, top_k: int = TOP_K,
                     key: dict | None = None) -> dict:
    """Save the reference's top-``top_k`` log-probs + tail mass per position of ``texts`` to ``out_path`` (npz),
    under ``key`` (the bench's result key of the reference: what ``divergence`` checks it against)."""
    import numpy as np

    from edgemed.files.atomic import atomic_path

    texts = list(texts) if texts is not None else load_texts()
    tokens = _passages(scorer, texts)
    ids, logps, tails = [], [], []
    for toks in tokens:
        logp = _log_softmax(scorer.logits_all(toks))                         # [n, vocab]
        k = min(top_k, logp.shape[1])
        top = np.argpartition(-logp, k - 1, axis=1)[:, :k]                   # [n, k], unordered
        order = np.argsort(-np.take_along_axis(logp, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)                         # [n, k], most probable first
        ids.append(top.astype(np.int32))
        logps.append(np.take_along_axis(logp, top, axis=1).astype(np.float32))
        tails.append(_tail_logmass(logp, top).astype(np.float32))
    meta = {"format": FORMAT, "artifact": Path(scorer.path).name, "kind": scorer.kind, "top_k": int(ids[0].shape[1]),
            "n_vocab": int(scorer.n_vocab), "texts": texts, "tokens": tokens, "key": key}
    out_path = Path(out_path)
    with atomic_path(out_path, force=True) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, meta=np.array(json.dumps(meta)), ids=np.concatenate(ids),
                                logp=np.concatenate(logps), tail=np.concatenate(tails))
    n = sum(len(t) for t in tokens)
    log.info("divergence reference: %d passages, %d positions, top-%d -> %s", len(texts), n, meta["top_k"], out_path)
    return {"n_tokens": n, "n_texts": len(texts), "top_k": meta["top_k"], "path": str(out_path)}


def read_reference(path: Path) -> tuple[dict, dict]:
    import numpy as np

    try:
        with np.load(Path(path)) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in ("ids", "logp", "tail")}
    except FileNotFoundError:
        raise InputError(f"Divergence reference '{path}' does not exist.",
                         "build it first from the F16 artifact with reference_logits (bench phase 'divergence')") from None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"'{path}' is not a divergence reference ({exc}).", "rebuild it with reference_logits") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"'{path}' has format {meta.get('format')!r}, not {FORMAT}.", "rebuild it with this edgemed")
    return meta, arrays


def reference_key(path: Path) -> dict | None:
    """The key the reference at ``path`` was written under; None when it is missing, unreadable or has none."""
    import numpy as np

    try:
        with np.load(Path(path)) as data:  # the meta entry alone: the logits stay on disk
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError):
        return None
    return meta.get("key") if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _check_key(path: Path, meta: dict, key: dict) -> None:
    """Refuse a reference written under another key than ``key`` (another reference artifact, build or setting)."""
    have = meta.get("key")
    if have == key:
        return
    if not isinstance(have, dict):
        why = "it names no key (written by an earlier edgemed or by hand)"
    else:
        parts = sorted(k for k in set(have) | set(key) if have.get(k) != key.get(k))
        why = "its " + ", ".join(parts) + " differ" + ("s" if len(parts) == 1 else "")
        if "model_sha256" in parts:
            why += f" (it is of {str(have.get('model_sha256'))[:16]}, the reference now is {str(key.get('model_sha256'))[:16]})"
    raise InputError(f"The divergence reference '{path}' is not of the current reference artifact and settings: {why}; "
                     "a divergence against it would be labelled with a reference it was not measured against.",
                     "measure the reference again: run the divergence phase with the reference configuration (f16) "
                     "in the run")


def divergence(scorer, reference_path: Path, key: dict | None = None) -> dict:
    """KL(reference || scorer's artifact) per position over the reference's passages; top-1 agreement. ``key``: the
    key the reference must have been written under (``reference_logits``), refused otherwise."""
    import numpy as np

    meta, ref = read_reference(reference_path)
    if key is not None:
        _check_key(reference_path, meta, key)
    tokens = _passages(scorer, meta["texts"])
    if tokens != meta["tokens"]:
        bad = next(i for i, (a, b) in enumerate(zip(tokens, meta["tokens"])) if a != b) if len(tokens) == len(meta["tokens"]) else 0
        raise InputError(f"{Path(scorer.path).name} tokenizes passage {bad + 1} differently from the reference "
                         f"{meta['artifact']}, so their distributions cannot be compared position by position.",
                         "compare artifacts converted from the same checkpoint (same tokenizer)")
    passages, tail_mass = [], []
    row = 0
    for toks in tokens:
        n = len(toks)
        ids, p_log, p_tail = ref["ids"][row:row + n], ref["logp"][row:row + n].astype(np.float64), ref["tail"][row:row + n].astype(np.float64)
        q_all = _log_softmax(scorer.logits_all(toks))                        # [n, vocab]
        q_log = np.take_along_axis(q_all, ids, axis=1)
        q_tail = _tail_logmass(q_all, ids)
        p = np.exp(p_log)
        kl = (p * (p_log - q_log)).sum(axis=1)
        pt = np.exp(p_tail)
        with np.errstate(invalid="ignore"):
            kl += np.where(pt > 0, pt * (p_tail - q_tail), 0.0)
        passages.append((np.maximum(kl, 0.0), q_all.argmax(axis=1) == ids[:, 0]))
        tail_mass.append(pt)
        row += n
    return summarize(passages) | {
        "top_k": meta["top_k"], "tail_mass_mean": float(np.concatenate(tail_mass).mean()),
        "reference": meta["artifact"],
    }
