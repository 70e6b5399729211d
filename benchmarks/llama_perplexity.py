"""llama.cpp's ``llama-perplexity --kl-divergence``, as read off its source: running it, its base file, its log.

Read off ``tools/perplexity/perplexity.cpp`` (the vendored llama.cpp of llama-cpp-python 0.3.36, built by
``anchors.py``). With ``-f TEXT -c n --kl-divergence-base BASE`` it reads the file whole, drops one trailing
newline, tokenizes it once with ``add_special`` (BOS only where the vocabulary's ``add_bos`` says so) and no
special-token parsing, and cuts ``len // n`` chunks of n tokens (the rest dropped; at least 2 chunks). Each chunk
is decoded from an empty KV cache with its first token replaced by BOS when ``add_bos``. Rows ``first = n // 2``
.. ``n - 2`` are scored (``n - 1 - first`` rows; row i predicts token i + 1): their log-probs go to BASE as 16-bit
steps over the top 16 nats of logits (2.4e-4 nats a step; lower ones at the floor), after a header (``_logits_``,
n, vocab, chunks) and the chunks' tokens as tokenized (before the BOS swap). With ``--kl-divergence`` the quant
decodes BASE's tokens the same way; per row its KL is ``sum p_base * (log p_base - log q)`` over the tokens whose
base log-prob exceeds -16; "Mean KLD" is the mean over every scored row of every chunk, ± sqrt(var / (count - 1));
"Same top p" is the share of rows whose argmax equals the 16-bit base's, ± the binomial error. The statistics
block is printed only from 100 scored rows. ``llamacpp_kl`` repeats that estimator on other logits.

Checked against ``edgemed.converters.quality.fidelity`` (VERSION 2): ``llamacpp_rows(n)`` is this row range for every n >= 4. For
n = 3 perplexity.cpp scores one row (row 1) where fidelity scores none (``LLAMACPP_MIN_TOKENS = 4``; 3 would
match): no llama-perplexity window is that short, but a 3-token passage is. fidelity clamps a row's KL at 0 and
takes the argmax of the raw reference; perplexity.cpp does neither: differences of rounding size.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

from edgemed.errors import EdgemedError, InputError

MAGIC = b"_logits_"
PERCENTILES = {"Maximum": "max", "99.9%": "p99.9", "99.0%": "p99", "95.0%": "p95", "90.0%": "p90",
               "Median": "median", "10.0%": "p10", "5.0%": "p5", "1.0%": "p1", "0.1%": "p0.1", "Minimum": "min"}
#: perplexity.cpp's error lines in these modes (it exits 0 after them)
FAILED = re.compile(r"failed to (decode|open|create)|failed reading|you need at least|does not look like|"
                    r"inconsistent vocabulary|unable to load model")
_NUM = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


def binary() -> Path:
    from edgemed.benchmarks import anchors

    try:
        return anchors.binaries()["llama-perplexity"]
    except (EdgemedError, KeyError):
        raise InputError("llama.cpp's llama-perplexity (the KLD anchor) has not been built for this llama-cpp-python.",
                         "run `python -m edgemed.benchmarks.anchors build` (about 10-20 minutes on 2 cores)") from None


def placement_flags(mode: str) -> list[str]:
    """llama-perplexity's flags for edgemed's extra-buffer mode (it has only on and off)."""
    if mode not in ("all", "none"):
        raise InputError(f"--extra-buffers {mode}: llama-perplexity can only run llama.cpp's extra buffers on or off.",
                         "use --extra-buffers all or none")
    return [] if mode == "all" else ["--no-repack"]


def run(exe: Path, model: Path, args: list[str], log_path: Path) -> str:
    """Run it on ``model``; its log (also left at ``log_path``), or an error with the log's tail."""
    cmd = [str(exe), "-m", str(model), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.stdout.decode("utf-8", "replace")
    log_path.write_text(log, encoding="utf-8")
    if proc.returncode != 0 or FAILED.search(log):
        raise EdgemedError(f"llama-perplexity failed on {model.name} (exit {proc.returncode}): {log.strip()[-500:]}",
                           f"read {log_path}; the command was: {' '.join(cmd)}")
    return log


def read_base(path: Path):
    """Header, stored tokens and a per-chunk reader of dequantized base log-probs ([rows, vocab], floors [rows])."""
    import numpy as np

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(raw[:8]) != MAGIC:
        raise InputError(f"'{path}' is not a llama-perplexity --kl-divergence-base file.", "let kld_anchor make it")
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", bytes(raw[8:20]))
    tokens = np.frombuffer(raw, dtype=np.int32, count=n_ctx * n_chunk, offset=20).tolist()
    nv, rows = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2  # a row: 2 floats (4 uint16), then the vocab
    start = 20 + 4 * n_ctx * n_chunk

    def chunk(k: int):
        block = np.frombuffer(raw, dtype=np.uint16, count=rows * nv, offset=start + 2 * k * rows * nv).reshape(rows, nv)
        head = np.ascontiguousarray(block[:, :4]).view(np.float32)  # [rows, 2]: step, floor log-prob
        return head[:, :1] * block[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2], head[:, 1]

    return {"n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk}, tokens, chunk


def parse_log(log: str) -> dict:
    """Mean KLD ± err, the KLD percentiles, Same top p ± err, PPLs and RMS dp from a --kl-divergence log."""
    out: dict = {}
    if m := re.search(rf"Mean\s+KLD:\s*({_NUM})\s*±\s*({_NUM})", log):
        out["kld_mean"], out["kld_err"] = float(m[1]), float(m[2])
    out["kld_percentiles"] = {key: float(m[1]) for name, key in PERCENTILES.items()
                              if (m := re.search(rf"^\s*{re.escape(name)}\s+KLD:\s*({_NUM})", log, re.M))}
    if m := re.search(rf"Same top p:\s*({_NUM})\s*±\s*({_NUM})\s*%", log):
        out["same_top"], out["same_top_err"] = float(m[1]) / 100, float(m[2]) / 100
    for name, key in (("Mean PPL(Q)", "ppl"), ("Mean PPL(base)", "ppl_base")):
        if m := re.search(rf"{re.escape(name)}\s*:\s*({_NUM})", log):
            out[key] = float(m[1])
    if m := re.search(rf"RMS Δp\s*:\s*({_NUM})", log):
        out["rms_dp"] = float(m[1]) / 100
    if m := re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", log):
        out["n_chunk"], out["n_ctx"] = int(m[1]), int(m[2])
    return out


def statistics_block(log: str) -> list[str]:
    """The final statistics lines of a --kl-divergence log (kept with the results as provenance)."""
    part = log.split("====== Perplexity statistics ======", 1)
    return [ln for ln in ("======" + part[1]).splitlines() if ln.strip()][:48] if len(part) == 2 else []


def mean_and_error(values) -> tuple[float, float]:
    """Its mean and uncertainty: sqrt((E[x^2] - E[x]^2) / (count - 1)), 0 for 10 values or fewer."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    var = float((x * x).mean() - mean * mean)
    return mean, (var / (x.size - 1)) ** 0.5 if var > 0 and x.size > 10 else 0.0


def llamacpp_kl(reference_logits, artifact_logits):
    """KL per row ([rows, vocab] logits each) as perplexity.cpp computes it: float32, the reference's log-probs in
    16-bit steps over its top 16 nats of logits (lower ones at the floor), terms at base log-prob <= -16 left out."""
    import numpy as np

    from edgemed.converters.quality import fidelity

    a = np.asarray(reference_logits, dtype=np.float32)
    top = a.max(axis=1, keepdims=True)
    low = np.maximum(a.min(axis=1, keepdims=True), top - 16)
    lse = np.log(np.exp(a - top).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    step = (top - low) / np.float32(65535)
    steps = np.where(a > low, np.rint((a - low) * (1 / step)), 0).astype(np.float32)
    base = step * steps + (low - top - lse)                                  # [rows, vocab] dequantized log p
    terms = np.exp(base) * (base - fidelity.log_softmax(artifact_logits))
    return np.where(base > -16, terms, 0.0).sum(axis=1)
