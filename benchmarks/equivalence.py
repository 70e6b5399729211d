"""Two builds of edgemed compute the same thing: tensor data of converted GGUFs, answers of the server.

    python -m edgemed.benchmarks.equivalence --source CKPT --gguf MODEL.gguf --out before.json   # at one commit
    python -m edgemed.benchmarks.equivalence --source CKPT --gguf MODEL.gguf --out after.json    # at another
    python -m edgemed.benchmarks.equivalence --compare before.json after.json

Only the public command line is used (``edgemed convert``, ``edgemed serve``), so the same script runs
unchanged against any layout of the code. For a restructure that must not change behaviour:

- **converter**: SOURCE converted to F16 and to Q4_K_M (the CLI's defaults: imatrix from the shipped
  medical text for Q4_K_M; parity off, it changes no byte), every tensor's data hashed (sha256) as the
  gguf reader sees it, plus one digest over all tensors in file order;
- **server**: ``edgemed serve GGUF`` (4 slots, 2 threads) answers a fixed set of requests (chat and
  completions, whole and streamed, greedy and seeded sampling, a JSON-schema response, two at once);
  each answer is kept byte for byte after removing what must differ between two runs (``id``,
  ``created``, the request id header is not read).

``--compare`` prints each difference and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUANTS = ("f16", "q4_k_m")
QUESTION = "A patient on warfarin starts taking ibuprofen for back pain. What is the main risk?"
SCHEMA = {"type": "object", "properties": {"risk": {"type": "string"}, "urgent": {"type": "boolean"}},
          "required": ["risk", "urgent"]}


def _edgemed() -> list[str]:
    return [sys.executable, "-m", "edgemed"]


def tensor_digests(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    whole = hashlib.sha256()
    per = {}
    for t in reader.tensors:
        data = bytes(t.data.tobytes())
        per[t.name] = {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                       "sha256": hashlib.sha256(data).hexdigest()}
        whole.update(t.name.encode() + b"\0" + data)
    return {"tensors": per, "all_tensors_sha256": whole.hexdigest(), "n_tensors": len(per)}


def converter(source: Path, work: Path, threads: int) -> dict:
    out = {}
    for quant in QUANTS:
        target = work / f"model-{quant}.gguf"
        cmd = _edgemed() + ["convert", str(source), "--quant", quant, "-o", str(target), "--no-parity",
                            "--threads", str(threads), "--force"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out[quant] = tensor_digests(target)
        print(f"converter {quant}: {out[quant]['n_tensors']} tensors, all {out[quant]['all_tensors_sha256'][:16]}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests() -> list[tuple[str, str, dict]]:
    chat = [{"role": "user", "content": QUESTION}]
    turns = chat + [{"role": "assistant", "content": "Bleeding."}, {"role": "user", "content": "What should be done?"}]
    return [
        ("chat-greedy", "/v1/chat/completions", {"messages": chat, "max_tokens": 48, "temperature": 0}),
        ("chat-two-turns", "/v1/chat/completions", {"messages": turns, "max_tokens": 48, "temperature": 0}),
        ("chat-seeded", "/v1/chat/completions", {"messages": chat, "max_tokens": 48, "temperature": 0.8,
                                                 "top_p": 0.9, "seed": 1234}),
        ("chat-stream", "/v1/chat/completions", {"messages": chat, "max_tokens": 32, "temperature": 0,
                                                 "stream": True, "stream_options": {"include_usage": True}}),
        ("chat-json", "/v1/chat/completions", {"messages": chat, "max_tokens": 64, "temperature": 0,
                                               "response_format": {"type": "json_schema", "json_schema": {
                                                   "name": "risk", "schema": SCHEMA}}}),
        ("completion-greedy", "/v1/completions", {"prompt": "Anaphylaxis first-line treatment is", "max_tokens": 32,
                                                  "temperature": 0}),
        ("completion-stream", "/v1/completions", {"prompt": "Sepsis is", "max_tokens": 24, "temperature": 0,
                                                  "stream": True}),
        ("bad-request", "/v1/chat/completions", {"messages": [], "max_tokens": 8}),
    ]


def _scrub(obj):
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if k not in ("id", "created")}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _send(client, url: str, body: dict) -> dict:
    if body.get("stream"):
        chunks = []
        with client.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    chunks.append(data if data == "[DONE]" else _scrub(json.loads(data)))
            return {"status": r.status_code, "chunks": chunks}
    r = client.post(url, json=body)
    return {"status": r.status_code, "body": _scrub(r.json())}


def server(gguf: Path, threads: int) -> dict:
    try:
        import httpx2 as httpx  # the HTTP client the openai package ships with
    except ImportError:
        import httpx

    port = _free_port()
    cmd = _edgemed() + ["serve", str(gguf), "--port", str(port), "--slots", "4", "--threads", str(threads),
                        "--ctx", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=300) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if client.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"edgemed serve did not start (exit {proc.poll()})")
                time.sleep(0.2)
            model = client.get(base + "/v1/models").json()["data"][0]["id"]
            requests = [(name, path, dict(body, model=model) if body.get("messages") or body.get("prompt") else body)
                        for name, path, body in _requests()]
            answers = {name: _send(client, base + path, body) for name, path, body in requests}
            # two at once: the batcher decodes them together; each must still be what it is alone
            pair = [r for r in requests if r[0] in ("chat-greedy", "completion-greedy")]
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                done = list(pool.map(lambda r: _send(client, base + r[1], r[2]), pair))
            for (name, _, _), answer in zip(pair, done):
                answers[f"{name}-concurrent"] = answer
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    for name, answer in answers.items():
        print(f"server {name}: {answer['status']}")
    return answers


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for quant in QUANTS:
        ta, tb = a["converter"][quant]["tensors"], b["converter"][quant]["tensors"]
        for name in sorted(set(ta) | set(tb)):
            if ta.get(name) != tb.get(name):
                diffs.append(f"converter {quant} tensor {name}: {ta.get(name)} != {tb.get(name)}")
    for name in sorted(set(a["server"]) | set(b["server"])):
        if a["server"].get(name) != b["server"].get(name):
            diffs.append(f"server {name}: {json.dumps(a['server'].get(name))[:300]} != "
                         f"{json.dumps(b['server'].get(name))[:300]}")
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="Hugging Face checkpoint directory to convert")
    ap.add_argument("--gguf", type=Path, help="GGUF the server answers with")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="where to write the figures (JSON)")
    ap.add_argument("--parts", default="converter,server", help="which parts to run (comma-separated); a part "
                    "left out keeps its figures from an existing --out file")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(a, b)
        for d in diffs:
            print(d)
        n_t = sum(len(a["converter"][q]["tensors"]) for q in QUANTS)
        print(f"{len(diffs)} differences ({n_t} tensors over {len(QUANTS)} types, {len(a['server'])} answers)")
        return 1 if diffs else 0
    if not (args.source and args.gguf and args.out):
        ap.error("--source, --gguf and --out are needed (or --compare BEFORE AFTER)")
    parts = set(args.parts.split(","))
    result = json.loads(args.out.read_text()) if args.out.exists() and parts != {"converter", "server"} else {}
    result.update({"source": str(args.source), "gguf": str(args.gguf), "threads": args.threads})
    work = Path(tempfile.mkdtemp(prefix="edgemed-equivalence-"))
    try:
        if "converter" in parts:
            result["converter"] = converter(args.source, work, args.threads)
        if "server" in parts:
            result["server"] = server(args.gguf, args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
