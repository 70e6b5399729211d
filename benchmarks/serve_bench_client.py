"""The two servers and the client load of ``serve_vs_llama_server`` (processes, SSE timing, the prefill check).

A server is a child process on a free loopback port, started once and stopped with SIGINT. The
client is one thread per stream with its own HTTP connection; every text chunk's arrival time is
kept, so TTFT, per-request decode rate and inter-token gaps all come from the same clock for both.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgemed.errors import EdgemedError

START_TIMEOUT_S = 300
#: scheduler counters edgemed's /metrics exposes (batcher.stats()), read before and after a run
EDGEMED_COUNTERS = ("decode_steps_total", "decode_seconds_total", "step_seconds_total", "idle_seconds_total")
#: ``settle``: a server is quiet when its process used under this share of one core over a whole window
SETTLE_CPU_SHARE = 0.05
SETTLE_WINDOW_S = 0.5
SETTLE_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    name = "?"

    def __init__(self, path: Path, threads: int, slots: int, ctx_per_slot: int):
        self.path, self.threads, self.slots, self.ctx_per_slot = path, threads, slots, ctx_per_slot
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the server's log and audit log, in a folder of its own (private, unpredictable; the report names the log)
        self.folder = Path(tempfile.mkdtemp(prefix=f"edgemed-bench-{self.name}-"))
        self.log = self.folder / "server.log"
        self.proc: subprocess.Popen | None = None
        self.model_id = ""

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict | None:
        """The server process's environment (None: this process's)."""
        return None

    def start(self) -> None:
        import httpx2

        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(self.command(), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env())
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._died()
            try:
                if httpx2.get(self.url + "/health", timeout=2).status_code == 200:
                    models = httpx2.get(self.url + "/v1/models", timeout=5).json()
                    self.model_id = models["data"][0]["id"]
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.5)
        raise EdgemedError(f"{self.name} did not answer /health within {START_TIMEOUT_S} s.", f"read {self.log}")

    def _died(self) -> EdgemedError:
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited (code {code})"
        fix = f"read {self.log}"
        if self.name == "llama-server" and code in (-signal.SIGSEGV, 128 + signal.SIGSEGV):
            fix += ("; on a CPU with AMX, llama.cpp's default extra buffers crash on the first decode: give it "
                    "--server-arg=--no-repack (the report names it)")
        return EdgemedError(f"{self.name} {how} at start: {self.log.read_text(errors='replace')[-1500:]}", fix)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server's process so far (all its threads)."""
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def thread_cpu(self) -> dict[int, float]:
        """Each thread of the server's process: its id -> user + system CPU seconds so far. Read around a run, it
        shows how the CPU went between llama.cpp's compute threads and the serving threads (HTTP, the event
        loop, the audit): on a box with as many cores as compute threads, serving CPU is taken from compute."""
        import psutil

        return {t.id: t.user_time + t.system_time for t in psutil.Process(self.proc.pid).threads()}

    def describe(self) -> dict:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        info = cpu_features_line(text)
        return {"command": [str(c) for c in self.command()], "system_info": info, "log": str(self.log),
                "weight_buffers_mib": weight_buffers(text)}


def matched_extra_buffers(server_args) -> str | None:
    """The ``extra_buffers`` edgemed needs to run the kernels llama-server runs with ``server_args`` (its
    ``--server-arg`` list): ``--no-repack`` turns off all of llama.cpp's extra buffers (CPU_REPACK and AMX), which is
    edgemed's ``"none"``; None where they leave llama-server's default, and edgemed keeps its profile's."""
    return "none" if "--no-repack" in tuple(server_args) else None


def weight_buffers(text: str) -> dict[str, float] | None:
    """llama.cpp's ``load_tensors: NAME model buffer size = X MiB`` lines in ``text`` (a server's log), name -> MiB:
    where the weights went (``CPU_REPACK``/``AMX``: an extra buffer). None where the log has none (edgemed serve
    writes llama.cpp's own log only at -vv)."""
    from edgemed.runtime.buffers import BUFFER_LINE

    found = {m[1]: float(m[2]) for m in re.finditer(BUFFER_LINE, text)}
    return found or None


class EdgemedServer(_Server):
    name = "edgemed"

    def __init__(self, path: Path, threads: int, slots: int, ctx_per_slot: int, prefix_cache: bool = False,
                 adapters: tuple[Path, ...] = (), extra: tuple[str, ...] = (), extra_buffers: str | None = None):
        self.prefix_cache = prefix_cache
        self.adapters = tuple(adapters)  # GGUF LoRA adapter files served beside the base (model "NAME:ADAPTER")
        self.extra = tuple(extra)  # more `edgemed serve` options (an arm of a comparison)
        # the weights' placement (runtime/buffers.py's modes), else the profile's: matched_extra_buffers gives the
        # one llama-server's arguments ask for, so both arms run the same kernels
        self.extra_buffers = extra_buffers
        super().__init__(path, threads, slots, ctx_per_slot)
        self.profile = self._override_profile(extra_buffers) if extra_buffers else None

    def _override_profile(self, mode: str) -> str:
        """A copy of the profile edgemed would run (``--profile`` in ``extra``, else the detected one) with
        ``extra_buffers = mode``, written to this server's folder (``env`` names it in $EDGEMED_PROFILES_DIR);
        its name. Read back through edgemed's own profile reader before any server starts."""
        from edgemed.devices.detect import resolve
        from edgemed.devices.profiles import read_profile

        base, _ = resolve(self._asked_profile())
        name = f"{base.name}-extra-buffers-{mode}"
        text = Path(base.source).read_text(encoding="utf-8")  # the file the profile was read from
        text = re.sub(r'(?m)^name\s*=.*$', f'name = "{name}"', text, count=1)
        text = re.sub(r'(?m)^extra_buffers\s*=.*\n', "", text)
        text, n = re.subn(r'(?m)^\[llama\]\s*$', f'[llama]\nextra_buffers = "{mode}"  # benchmark arm: as llama-server was run',
                          text, count=1)
        folder = self.folder / "profiles"
        folder.mkdir(exist_ok=True)
        out = folder / f"{name}.toml"
        out.write_text(text if n else text + f'\n[llama]\nextra_buffers = "{mode}"\n', encoding="utf-8")
        if read_profile(out).llama.get("extra_buffers") != mode:
            raise EdgemedError(f"could not set extra_buffers = \"{mode}\" in a copy of the profile {base.name}",
                               f"read {out}")
        return name

    def _asked_profile(self) -> str | None:
        args = list(self.extra)
        for i, a in enumerate(args):
            if a == "--profile" and i + 1 < len(args):
                return args[i + 1]
            if a.startswith("--profile="):
                return a.split("=", 1)[1]
        return None

    def env(self) -> dict | None:
        if self.profile is None:
            return None
        import os

        from edgemed import env

        dirs = os.environ.get(env.PROFILES_VAR)
        return os.environ | {env.PROFILES_VAR: os.pathsep.join([*([dirs] if dirs else []), str(self.folder / "profiles")])}

    def command(self) -> list[str]:
        audit = self.folder / "audit.jsonl"
        cmd = [sys.executable, "-m", "edgemed", "serve", str(self.path), "--port", str(self.port),
               "--slots", str(self.slots), "--ctx", str(self.ctx_per_slot), "--threads", str(self.threads),
               "--queue", "16", "--audit-log", str(audit)]
        for adapter in self.adapters:
            cmd += ["--adapter", str(adapter)]
        extra = list(self.extra)
        if self.profile is not None:  # the overriding copy instead of the profile it copies
            extra = [a for i, a in enumerate(extra) if not (a == "--profile" or a.startswith("--profile=")
                                                            or (i and extra[i - 1] == "--profile"))]
            extra += ["--profile", self.profile]
        cmd += extra
        # by default every request cold, as llama-server is asked to be (cache_prompt: false)
        return cmd if self.prefix_cache else cmd + ["--no-prefix-cache"]

    def describe(self) -> dict:
        """As ``_Server.describe``, with the batch and micro-batch llama.cpp's context runs (``edgemed serve``'s
        start line, read back from the context; None before it started or from an edgemed that does not print it)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = re.search(r"batches of (\d+) in micro-batches of (\d+)", text)
        profile = re.search(r"profile (\S+), batches of", text)
        placed = re.search(r"^placement: (.*)$", text, re.M)  # `edgemed serve`'s start line, read back from llama.cpp
        buffers = placed and re.search(r"llama\.cpp placed ([^;]*)", placed[1])
        return super().describe() | {"n_batch": int(found[1]) if found else None,
                                     "placement": placed[1] if placed else None,
                                     "weight_buffers_mib": {name: float(mib) for name, mib in re.findall(
                                         r"(\S+) ([\d.]+) MiB", buffers[1])} if buffers else None,
                                     "n_ubatch": int(found[2]) if found else None,
                                     "profile": profile[1] if profile else None,
                                     "extra_buffers": self.extra_buffers or "the profile's",
                                     **({"profile_override": str(self.folder / "profiles" / f"{self.profile}.toml"),
                                         "profiles_dir": self.env()["EDGEMED_PROFILES_DIR"]} if self.profile else {})}

    def scheduler_metrics(self) -> dict[str, float]:
        import httpx2

        out = {}
        for line in httpx2.get(self.url + "/metrics", timeout=10).text.splitlines():
            for key in EDGEMED_COUNTERS:
                if line.startswith(f"edgemed_{key} ") or line.startswith(f"edgemed_{key.removesuffix('_total')}_total "):
                    out[key] = float(line.split()[-1])
        out["wall_seconds"] = time.monotonic()
        return out


class LlamaServer(_Server):
    name = "llama-server"

    def __init__(self, binary: Path, loras: tuple[Path, ...] = (), extra: tuple[str, ...] = (), **kw):
        self.binary = binary
        self.loras = tuple(loras)  # --lora files, loaded at scale 0: a request applies one with "lora": [{"id", "scale"}]
        self.extra = tuple(extra)  # --server-arg: only where the host cannot run it otherwise; its command names them
        super().__init__(**kw)

    def command(self) -> list[str]:
        # edgemed's device-profile defaults made explicit: n_batch = n_ubatch = 512, flash attention off, no
        # mmap, f16 KV, one KV stream per slot (-np without --kv-unified); no prompt cache kept in RAM.
        return [str(self.binary), "-m", str(self.path), "--host", "127.0.0.1", "--port", str(self.port),
                "-np", str(self.slots), "-c", str(self.slots * self.ctx_per_slot), "-t", str(self.threads),
                "-tb", str(self.threads), "-b", "512", "-ub", "512", "-fa", "off", "--load-mode", "none", "--fit", "off", "--metrics",
                "--cache-ram", "0"] + self._lora_args() + list(self.extra)

    def describe(self) -> dict:
        """As for any server; the CPU features from a probe of the same build when the log has none (llama-server
        logs its system info only at trace verbosity, which would slow the run it describes)."""
        out = super().describe()
        if out["system_info"] is None:
            if not hasattr(self, "_probed"):
                self._probed = probe_cpu_features(self.binary.parent / "llama-perplexity", self.path, self.threads,
                                                  self.extra)
            out["system_info"], out["system_info_from"] = self._probed, "llama-perplexity of the same build"
        return out

    def _lora_args(self) -> list[str]:
        if not self.loras:
            return []
        return [a for f in self.loras for a in ("--lora", str(f))] + ["--lora-init-without-apply"]


def cpu_features_line(text: str) -> str | None:
    """The ``CPU : SSE3 = 1 | ...`` part of llama.cpp's system info in ``text`` (a log), or None."""
    return next((ln[ln.index("CPU :"):].strip() for ln in text.splitlines() if "CPU :" in ln), None)


def probe_cpu_features(binary: Path, model: Path, threads: int, extra: tuple[str, ...] = ()) -> str | None:
    """The CPU features a llama.cpp build computes with, from its ``llama-perplexity`` (built with the same flags and
    static libraries as its llama-server, and which logs its system info at the default verbosity): one 128-token
    chunk of a small text on ``model``. None where it cannot run (its reason is in the report's log)."""
    if not binary.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "probe.txt"
        text.write_text("The patient presents with fever, cough and shortness of breath for three days. " * 40)
        cmd = [str(binary), "-m", str(model), "-f", str(text), "-c", "128", "-b", "128", "--chunks", "1",
               "-t", str(threads), *[a for a in extra if a == "--no-repack"]]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
    return cpu_features_line(proc.stdout)


def add_server_arg(ap) -> None:
    """``--server-arg`` (repeatable): one more llama-server argument, for a host where its settings cannot run."""
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="one more llama-server argument (repeat for each), for a host where it cannot run otherwise "
                         "(an AMX build's default extra buffers segfault: --server-arg=--no-repack); the report "
                         "names it in the server's command")


def sse_events(client, server: _Server, path: str, body: dict):
    """POST ``body`` to ``path`` and yield ``(arrival time, event)`` for each SSE data event until ``[DONE]``.
    A status other than 200 is an error naming the server's log; so is a failure after the 200 header (both servers
    send it as an ``{"error": ...}`` event) and a stream that ends without ``[DONE]`` (cut off): a request that
    failed is never measured as one that answered. Leaving the loop closes the response (which cancels the request
    on both servers)."""
    chunks = 0
    with client.stream("POST", server.url + path, json=body, timeout=900) as resp:
        if resp.status_code != 200:
            raise EdgemedError(f"{server.name} answered {resp.status_code}: {resp.read()[:500]!r}", f"read {server.log}")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data.strip() == "[DONE]":
                return
            event = json.loads(data)
            if isinstance(event, dict) and event.get("error") is not None:
                raise EdgemedError(f"{server.name} failed a request after {chunks} events (mid-stream, after its 200 "
                                   f"header): {json.dumps(event['error'])[:500]}", f"read {server.log}")
            chunks += 1
            yield time.perf_counter(), event
    raise EdgemedError(f"{server.name}'s stream ended after {chunks} events without [DONE]: the request was cut off, "
                       "not answered", f"read {server.log}")


def ttft_cell(p50: float | None, p99: float | None, n: int | None) -> str:
    """A report's "TTFT p50 / p99" cell with the number of requests behind it: over fewer than 100 samples the p99
    lies between the slowest two (linear interpolation), so without its n it reads as a tail it is not."""
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return f"{f(p50)} / {f(p99)} s" + (f" (n = {n})" if n else "")


def save_results(out: Path, result: dict, markdown: str) -> None:
    """``out`` (JSON) and the report beside it (``.md``), each written atomically; the report is printed."""
    from edgemed.files.atomic import write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=2) + "\n", force=True)
    write_text(out.with_suffix(".md"), markdown, force=True)
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md').name}")


def stream_request(client, server: _Server, prompt: str, max_tokens: int, stop: threading.Event | None = None,
                   times: list[float] | None = None, extra: dict | None = None, drop: tuple[str, ...] = ()) -> dict:
    """One streaming /v1/completions request: arrival time of each text chunk (into ``times``, live), usage, timings.
    ``extra``: body fields added or replaced (e.g. another ``model``, llama-server's ``lora``); ``drop``: body fields
    left out (``("cache_prompt",)``: the body a client sends, each server's own default)."""
    body = {"model": server.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": False} | (extra or {})
    body = {k: v for k, v in body.items() if k not in drop}
    t0 = time.perf_counter()
    times = [] if times is None else times
    tokens, finish, timings = 0, None, None
    with contextlib.closing(sse_events(client, server, "/v1/completions", body)) as events:
        for now, event in events:
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    times.append(now)
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            timings = event.get("timings") or timings
            if stop is not None and stop.is_set():
                break  # closing the response cancels the request on both servers
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    return {"t0": t0, "times": times, "ttft_s": (times[0] - t0) if times else float("nan"), "tokens": tokens or len(times),
            "finish": finish or "cancelled", "decode_tok_s": ((tokens or len(times)) - 1) / decode_s if decode_s else None,
            "server_tok_s": (timings or {}).get("predicted_per_second")}


def settle(servers, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
    """Wait until every running server in ``servers`` has been quiet for a whole ``SETTLE_WINDOW_S`` (under
    ``SETTLE_CPU_SHARE`` of a core); return the seconds waited. Call it before each measured unit: the servers share
    the cores, and work one does after its last answer (edgemed feeds finished answers back into their slots while
    idle) would otherwise run during the other's measurement and slow it down."""
    live = [s for s in servers if s.proc is not None and s.proc.poll() is None]
    t0 = time.monotonic()
    last = [s.cpu_seconds() for s in live]
    while True:
        time.sleep(SETTLE_WINDOW_S)
        now = [s.cpu_seconds() for s in live]
        busy = [s.name for s, a, b in zip(live, last, now) if b - a > SETTLE_CPU_SHARE * SETTLE_WINDOW_S]
        if not busy:
            return round(time.monotonic() - t0, 3)
        if time.monotonic() - t0 > timeout_s:
            raise EdgemedError(f"{', '.join(busy)} kept using the CPU for {timeout_s:.0f} s after its last request: "
                               "a measurement now would share the cores with it.",
                               "read the server's log, and stop whatever else runs on this machine")
        last = now


def run_gated(n: int, body) -> None:
    """Run ``body(i, gate)`` for i in 0..n-1 on n threads released together at ``gate.wait()``. A failing thread
    breaks the barrier, so the others never wait for it; the first error other than that break is raised here."""
    errors: list[BaseException] = []
    gate = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            body(i, gate)
        except BaseException as exc:  # noqa: BLE001 - raised below, on the caller's thread
            errors.append(exc)
            gate.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]


def run_level(server: _Server, prompts: list[str], streams: int, requests: int, max_tokens: int,
              extra_for=None) -> list[dict]:
    """``streams`` client threads, each sending ``requests`` requests back to back (closed loop). ``extra_for``:
    stream index -> body fields its requests add (``stream_request``'s ``extra``), kept in each row as ``extra``."""
    import httpx2

    rows: list[dict] = []
    lock = threading.Lock()

    def worker(i: int, gate) -> None:
        with httpx2.Client() as client:
            gate.wait()
            extra = extra_for(i) if extra_for is not None else None
            for j in range(requests):
                row = stream_request(client, server, prompts[(i + j * streams) % len(prompts)], max_tokens, extra=extra)
                row.pop("times")
                if extra is not None:
                    row["extra"] = extra
                with lock:
                    rows.append(row)

    run_gated(streams, worker)
    return rows


def long_prompt(vocab, n_tokens: int, header: str = "") -> str:
    """A chat prompt of about ``n_tokens`` tokens: a long synthetic clinical record and one question. ``header``:
    a first line of the record (a different one per run keeps a server's prompt cache from answering it)."""
    lines, day = ([header] if header else []), 0
    question = "\n\nSummarize the course above and list the three most important open problems."

    def render() -> str:
        return vocab.render_chat([{"role": "user", "content": "\n".join(lines) + question}])

    while len(vocab.tokenize(render(), True, True)) < n_tokens:
        day += 1
        lines.append(f"Day {day}: temperature {36.5 + (day % 7) / 5:.1f} C, heart rate {70 + day % 23} per minute, "
                     f"blood pressure {110 + day % 31}/{70 + day % 17} mmHg; creatinine {0.8 + (day % 9) / 10:.1f} mg/dL; "
                     f"the patient reports {('less', 'more', 'unchanged')[day % 3]} shortness of breath.")
    return render()


def prefill_check(server: _Server, prompts: list[str], long_text: str, max_tokens: int, running: int = 3,
                  warm_tokens: int = 24, drop: tuple[str, ...] = ()) -> dict:
    """Inter-token time of ``running`` decoding streams before, and while, a long prompt is prefilled. ``drop``:
    body fields every request leaves out (``stream_request``'s)."""
    import httpx2

    stop = threading.Event()
    results: list[dict | None] = [None] * running
    live: list[list[float]] = [[] for _ in range(running)]

    def worker(i: int) -> None:
        with httpx2.Client() as client:
            results[i] = stream_request(client, server, prompts[i % len(prompts)], 4 * max_tokens + 400, stop, live[i],
                                        drop=drop)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(running)]
    for t in threads:
        t.start()
    # wait until every running stream has decoded a while (their chunk lists fill inside stream_request)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and min(len(x) for x in live) < warm_tokens:
        time.sleep(0.05)
    t_send = time.perf_counter()
    with httpx2.Client() as client:
        long_row = stream_request(client, server, long_text, 4, drop=drop)
    t_first = long_row["t0"] + long_row["ttft_s"]
    time.sleep(1.0)  # a few more tokens after the prefill
    stop.set()
    for t in threads:
        t.join()
    before, during = [], []
    for r in results:
        ts = r["times"]
        for a, b in zip(ts, ts[1:]):
            if b <= t_send and a >= ts[min(4, len(ts) - 1)]:
                before.append(b - a)
            elif b > t_send and a < t_first:
                during.append(b - a)
    base = statistics.median(before)
    return {"gap_before_s": round(base, 4), "gaps_before": len(before),
            "gap_during_mean_s": round(statistics.mean(during), 4) if during else None,
            "gap_during_max_s": round(max(during), 4) if during else None, "gaps_during": len(during),
            "growth_mean": round(statistics.mean(during) / base, 3) if during else None,
            "growth_max": round(max(during) / base, 3) if during else None,
            "long_ttft_s": round(long_row["ttft_s"], 3), "prefill_window_s": round(t_first - t_send, 3)}



def server_timings(extra: dict | None) -> dict:
    """The server's own account of a response, where it gives one: llama-server adds ``timings`` (milliseconds of
    prompt processing and of generation, in its slot) to each completion; edgemed adds nothing (its scheduler's
    counters are read from ``/metrics`` instead: ``EdgemedServer.scheduler_metrics``)."""
    t = (extra or {}).get("timings")
    if not isinstance(t, dict) or not isinstance(t.get("predicted_ms"), (int, float)):
        return {}
    return {"server_prompt_ms": float(t.get("prompt_ms") or 0.0), "server_predicted_ms": float(t["predicted_ms"]),
            "server_predicted_n": int(t.get("predicted_n") or 0)}


def openai_chat_level(server: _Server, conversations: list[list[dict]], streams: int, requests: int,
                      max_tokens: int) -> list[dict]:
    """``streams`` threads of the official ``openai`` client, each sending ``requests`` chat completions back to
    back (non-streaming, greedy, ``max_tokens``; nothing but OpenAI's fields, so each server keeps its own
    defaults, ``cache_prompt`` included). Stream ``i``'s ``j``-th request asks ``conversations[(i + j * streams) %
    len]``. Rows: send time, latency, completion / prompt / cached tokens, finish reason, and the server's own
    timings where it gives them (``server_timings``)."""
    import openai

    rows: list[dict] = []
    lock = threading.Lock()

    def worker(i: int, gate) -> None:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=900) as client:
            gate.wait()
            for j in range(requests):
                t0 = time.perf_counter()
                resp = client.chat.completions.create(
                    model=server.model_id, messages=conversations[(i + j * streams) % len(conversations)],
                    max_tokens=max_tokens, temperature=0)
                details = resp.usage.prompt_tokens_details
                row = {"t0": t0, "latency_s": time.perf_counter() - t0, "tokens": resp.usage.completion_tokens,
                       "prompt_tokens": resp.usage.prompt_tokens,
                       "cached_tokens": details.cached_tokens if details is not None else None,
                       "finish": resp.choices[0].finish_reason, **server_timings(resp.model_extra)}
                with lock:
                    rows.append(row)

    run_gated(streams, worker)
    return rows
