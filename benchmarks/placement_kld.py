"""Does the weights' CPU placement move a KLD figure? One artifact against its F16, per ``extra_buffers`` mode.

    python -m edgemed.benchmarks.placement_kld --reference MODEL-f16.gguf --artifact MODEL-q4_k_m.gguf
    python -m edgemed.benchmarks.placement_kld ... --modes none all --passages 16 --out results.json

Parity and ``--quant auto`` read logits through ``edgemed.runtime.logits`` with ``extra_buffers = "none"``
(the file's weights computed where they are mapped); llama.cpp's CPU repack (``all``/``repack``) computes the
same quantized weights with other kernels. Here the reference's logits are read once ("none") and the
artifact's once per mode, on the passages ``--quant auto`` is scored on (the shipped ``medical-search`` text,
the first ``--tokens`` of each), and the figures of ``edgemed.converters.quality.fidelity`` are printed per mode.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def measure(reference: Path, artifact: Path, modes: list[str], n_passages: int, n_tokens: int, threads: int) -> dict:
    from edgemed.converters.gguf import calibration
    from edgemed.converters.quality import fidelity
    from edgemed.runtime import llamacpp
    from edgemed.runtime.logits import gguf_logits

    texts = calibration.passages(calibration.shipped(calibration.SEARCH_TEXT))[:n_passages]
    vocab = llamacpp.Model(reference, vocab_only=True)
    try:
        tokens = [vocab.tokenize(t, add_special=True)[:n_tokens] for t in texts]
    finally:
        vocab.close()
    ref = list(gguf_logits(reference, tokens, threads=threads))
    out = {}
    for mode in modes:
        rows = [fidelity.kl_rows(r, a) for r, a in zip(ref, gguf_logits(artifact, tokens, threads=threads,
                                                                        extra_buffers=mode))]
        figures = fidelity.summarize(rows)
        out[mode] = {k: figures[k] for k in ("kld_mean", "kld_p99", "kld_max", "top1", "n_tokens")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="the F16 GGUF")
    ap.add_argument("--artifact", type=Path, required=True, help="the quantized GGUF of the same model")
    ap.add_argument("--modes", nargs="+", default=["none", "all"], help="extra_buffers modes to compare")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256, help="tokens of each passage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    from edgemed.runtime import llamacpp

    result = {"reference": args.reference.name, "artifact": args.artifact.name, "threads": args.threads,
              "passages": args.passages, "tokens": args.tokens, "cpu": platform.processor() or platform.machine(),
              "system_info": llamacpp.build().system_info,
              "modes": measure(args.reference, args.artifact, args.modes, args.passages, args.tokens, args.threads)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
