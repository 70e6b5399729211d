"""The host self-test: load a model with the chosen settings and decode a few tokens in a child process.

llama.cpp can crash natively on some hosts (the AMX extra buffer type segfaults on
Sapphire Rapids, llama.cpp #20824); a crash in process would take the whole command
with it, with no message. So before a model that will compute is loaded in process,
``ensure`` looks up this host's verdict for the settings and the model's weight types,
and runs the check once in a child process when there is none. A child killed by a
signal becomes one paragraph (which signal, the build, the setting that avoids it, how
to persist it). When the asked settings crash and a safer extra-buffer mode passes,
that mode is used and the switch is said once (a warning).

Verdicts are cached in ``$EDGEMED_CACHE_DIR/selftest/verdicts.json`` keyed by a digest
of: llama-cpp-python's version, the build's system info, its library files' digest (a rebuild of the same
version by another compiler is another build: ``native_build``), the host's CPU flags, the
settings that change which kernels run (extra buffers, GPU layers, flash attention,
KV types, mmap), the model's weight types and, when LoRA adapters will be applied, their tensor types (the
child then decodes with them applied). Any of them changing runs the check again. A pass is kept for every file of
those types; a crash only for the file that crashed (``file_identity``), so one damaged or hostile file does not refuse
every other model of its types on the host.
``verdicts.py`` reads that file as untrusted and serializes its writers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgemed import env
from edgemed.errors import ModelLoadError
from edgemed.runtime import buffers, verdicts
from edgemed.runtime.engine import LoadSettings

log = logging.getLogger(__name__)
_said: set[str] = set()  # crash notices already given in this process

#: Seconds the child may take to load and decode before it counts as hung.
TIMEOUT_S = 600
#: Tokens the child decodes after its prompt (the AMX crash comes on the first decode).
DECODE_TOKENS = 4
CHECK_PROMPT = "The patient presents with chest pain and"
#: Deaths that say something about this host's llama.cpp build. SIGKILL is left out: it is what the
#: kernel's OOM killer sends, so it says "not enough memory now", not "this build crashes".
CRASH_SIGNALS = frozenset({"SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT", "SIGFPE"})
#: Settings fields that change which native code runs (threads and context sizes do not).
KEYED_FIELDS = ("extra_buffers", "n_gpu_layers", "flash_attn", "type_k", "type_v", "use_mmap")


@dataclass(frozen=True)
class Host:
    """What a verdict depends on, besides the settings and the model."""

    llama_cpp_version: str
    system_info: str
    cpu_flags: tuple[str, ...]
    #: digest of llama-cpp-python's native library files (``native_build.digest``): the same version and
    #: system info, compiled again by another compiler, can crash where the first build passed (AMX, GCC 12)
    library: str = ""

    @classmethod
    def current(cls) -> "Host":
        import llama_cpp

        from edgemed.runtime import native_build
        from edgemed.runtime.llamacpp import build

        return cls(getattr(llama_cpp, "__version__", "?"), build().system_info, tuple(sorted(cpu_flags())),
                   native_build.digest())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name") or line.startswith("Model"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def describe_host() -> str:
    """One line for logs and CI: the CPU, llama.cpp's build features and the extra buffers ``auto`` picks."""
    from edgemed.runtime import native_build
    from edgemed.runtime.llamacpp import build

    info = build()
    amx = sorted(f for f in cpu_flags() if f.startswith("amx"))
    made_by = native_build.compilers()
    picks = (("AMX where the self-test passes, else repack" if buffers.amx_may_be_tried(info) else
              "repack (AMX not tried: the CPU backend was compiled by a GCC before 13)")
             if info.has_amx else buffers.resolve("auto", info))
    return (f"{cpu_model()} (AMX: {', '.join(amx) if amx else 'no'}); llama.cpp build: "
            f"{info.system_info.strip().rstrip('|').strip()}"
            f"{'; compiled by ' + made_by[0] if made_by else ''}; extra buffers (auto): {picks}")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The host CPU's flags (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    mode: str                  # the concrete extra-buffer mode that was run
    signal: str | None = None  # e.g. "SIGSEGV" when the child was killed by one
    detail: str = ""           # the child's last words (no prompt or output text)

    @property
    def conclusive(self) -> bool:
        """A pass, or a native crash: a fact about this host. Anything else (a file llama.cpp refuses, too
        little memory, a timeout) is about this file or this moment: not cached, and the load in process
        reports it the usual way."""
        return self.ok or self.signal in CRASH_SIGNALS


def weight_types(path: Path, tensors=None) -> tuple[str, ...]:
    """The sorted ggml types of the model's tensors (``tensors``: an already read tensor table, else the file's)."""
    if tensors is None:
        from edgemed.formats.gguf_header import read_header

        tensors = read_header(path).tensors
    return tuple(sorted({t.type_name for t in tensors}))


def adapter_types(adapters) -> tuple[str, ...]:
    """The sorted ggml types of the adapters' tensors ("lora:F16"), the kernels a load with them adds."""
    from edgemed.formats.gguf_header import adapter_facts

    return tuple(sorted({f"lora:{t}" for a in adapters for t in adapter_facts(a.path).types}))


def key(host: Host, load: LoadSettings, types: tuple[str, ...], file: str | None = None) -> str:
    """The cache key of a verdict: host, settings, weight types; and ``file`` (``file_identity``) for a verdict that
    is not a pass, which is kept for that file alone."""
    keyed = {name: getattr(load, name) for name in KEYED_FIELDS}
    fault = os.environ.get(env.FAULT_VAR, "")  # an injected fault is another host, as far as the cache goes
    keys = {"host": asdict(host), "settings": keyed, "weights": list(types), "fault": fault}
    if file is not None:
        keys["file"] = file
    blob = json.dumps(keys, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_identity(path: Path) -> str:
    """Which file a crash verdict is about: its real path, size, modification time and inode (not its digest, which
    would read the whole file at every start)."""
    try:
        st = Path(path).stat()
        return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    except OSError:
        return str(path)


def _cached(hit) -> Verdict | None:
    return Verdict(**hit) if isinstance(hit, dict) and set(hit) == {"ok", "mode", "signal", "detail"} else None


def _read_cache() -> dict:
    return verdicts.read()


def _remember(digest: str, verdict: Verdict) -> None:
    verdicts.remember(digest, asdict(verdict))


def run_child(path: Path, load: LoadSettings, timeout: float = TIMEOUT_S, adapters=()) -> Verdict:
    """Load ``path`` with ``load`` (and ``adapters``: ``loader.AdapterSpec``s, applied to the context) and decode a
    few tokens in a fresh interpreter; never raises for a crash."""
    from edgemed.runtime.llamacpp import build

    mode = buffers.resolve(load.extra_buffers, build())
    # paths absolute: the child runs in edgemed's own folder (env.worker_cwd), never the user's
    args = [sys.executable, "-m", "edgemed.runtime.selftest", str(Path(path).absolute()),
            json.dumps(asdict(replace(load, extra_buffers=mode)))]
    if adapters:
        args.append(json.dumps([[str(Path(a.path).absolute()), a.scale] for a in adapters]))
    child_env = dict(env.worker_env(), **{env.SELFTEST_CHILD_VAR: "1"})
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=child_env, check=False,
                              cwd=env.worker_cwd())
    except subprocess.TimeoutExpired:
        return Verdict(False, mode, None, f"no answer within {timeout:.0f} s")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0 and last.startswith("{"):
        return Verdict(True, mode, None, last)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return Verdict(False, mode, name, proc.stderr.strip()[-300:])
    words = [line for line in (proc.stderr or last).strip().splitlines() if line.strip()]
    return Verdict(False, mode, None, (words[-1] if words else f"exit code {proc.returncode}")[-300:])


def crash_paragraph(path: Path, verdict: Verdict, host: Host, passed: str | None) -> str:
    """One paragraph for a native crash: what, on which build, what avoids it and how to keep it."""
    what = f"was killed by {verdict.signal}" if verdict.signal else f"failed ({verdict.detail or 'no output'})"
    avoid = (f"The setting extra_buffers = \"{passed}\" passes on this host" if passed else
             "No extra-buffer setting passed either")
    build = host.system_info.strip().rstrip("|").strip()
    return (f"llama.cpp {what} loading '{path.name}' and decoding {DECODE_TOKENS} tokens with extra_buffers = "
            f"\"{verdict.mode}\" (llama-cpp-python {host.llama_cpp_version}; build: {build}). {avoid}. To keep it, "
            f"copy the device profile's TOML (its path: `edgemed devices show NAME`) into $EDGEMED_PROFILES_DIR, "
            f"set extra_buffers = \"{passed or 'none'}\" under [llama] (a user profile overrides the shipped one "
            f"of the same name), and check again with `edgemed devices check MODEL`.{amx_hint(verdict, host)}")


def amx_hint(verdict: Verdict, host: Host) -> str:
    """For a crash with the AMX buffer in play: the build's compiler and the build that runs AMX; else ''."""
    if verdict.ok or not verdict.conclusive or verdict.mode != "all" or "AMX_INT8 = 1" not in host.system_info:
        return ""
    from edgemed.runtime import native_build

    made_by = native_build.compilers()
    return (f" The AMX kernels are the likely cause: this llama.cpp was compiled by "
            f"{made_by[0] if made_by else 'a compiler that left no name in it'}, and GCC 12.2 builds them so that "
            f"their first tile setup faults; a llama-cpp-python compiled with clang runs them (README, \"AMX hosts\").")


def check(path: Path, load: LoadSettings, *, host: Host | None = None, runner=None, use_cache: bool = True,
          tensors=None, adapters=(), fallback: bool = True, after_run=None):
    """[(settings, verdict)]: the asked mode first, then safer modes while the last one crashed natively
    (``fallback=False``: the asked mode alone, for a model already loaded with it). ``after_run``: called once each
    child has ended and before its verdict is kept; when it raises (the file the child loaded is not the one
    verified: ``packaging.ref.loaded_as_verified``), nothing of that child is kept.

    Conclusive verdicts (a pass, a native crash) are cached; an inconclusive one ends the list uncached. ``auto``'s
    own AMX try (``amx_try``) is the exception: whatever stops it, CPU_REPACK is tried next, and an inconclusive AMX
    verdict is kept too, so a host where it runs out of memory or time does not pay for it at every start
    (``devices check`` runs it again)."""
    from edgemed.runtime.llamacpp import build

    host = host or Host.current()
    runner = runner or run_child
    types = weight_types(path, tensors) + adapter_types(adapters)
    cache = _read_cache() if use_cache else {}
    mode = buffers.resolve(load.extra_buffers, build(), tested=fallback)
    asked = replace(load, extra_buffers=mode)
    tried: list[tuple[LoadSettings, Verdict]] = []
    this_file = file_identity(path)
    for candidate in [asked] + [replace(load, extra_buffers=m) for m in buffers.FALLBACKS
                                if buffers.FALLBACKS.index(m) > buffers.FALLBACKS.index(mode)]:
        # a pass holds for every file of these types; a crash (or the AMX try's inconclusive end) only for the file
        # it was seen with: one damaged or hostile file must not refuse every model of its types on this host
        digest, own = key(host, candidate, types), key(host, candidate, types, this_file)
        verdict = _cached(cache.get(digest))
        if verdict is None or not verdict.ok:
            verdict = _cached(cache.get(own))
        try_amx = amx_try(load, candidate)
        if verdict is None:
            verdict = runner(path, candidate, adapters=adapters) if adapters else runner(path, candidate)
            if after_run is not None:
                after_run()
            if verdict.conclusive or try_amx:
                _remember(digest if verdict.ok else own, verdict)
        tried.append((candidate, verdict))
        if not fallback or verdict.ok or not (verdict.conclusive or try_amx):
            break
    return tried


def amx_try(load: LoadSettings, candidate: LoadSettings) -> bool:
    """Whether ``candidate`` is ``auto``'s own try of the AMX buffer (``all`` on an AMX build)."""
    from edgemed.runtime.llamacpp import build

    return load.extra_buffers == "auto" and candidate.extra_buffers == "all" and build().has_amx


def auto_fell_back(load: LoadSettings, tried) -> bool:
    """Whether ``check``'s list is ``auto``'s own AMX try on an AMX build, crashed, then CPU_REPACK passing: the
    expected course on a build whose AMX kernels fault, not a failure of the asked settings."""
    (first_settings, first), (_, used) = tried[0], tried[-1]
    return amx_try(load, first_settings) and not first.ok and used.ok and used.mode == "repack"


def ensure(path: Path, load: LoadSettings, tensors=None, adapters=()) -> LoadSettings:
    """Settings safe to load ``path`` with in process (with ``adapters`` applied): ``load``, or a safer mode that
    passed (said once)."""
    if os.environ.get(env.SELFTEST_CHILD_VAR) == "1" or os.environ.get(env.SELFTEST_VAR) == "0":
        return load
    tried = check(path, load, tensors=tensors, adapters=adapters)
    if amx_try(load, tried[0][0]) and not tried[0][1].ok and not tried[0][1].conclusive:
        # the AMX try proved nothing (memory, time): the AMX buffer never loads in process unguarded, and what
        # followed it is judged as the asked mode would be
        if len(tried) == 1:
            return replace(load, extra_buffers="repack")
        tried = tried[1:]
    first_settings, first = tried[0]
    used_settings, used = tried[-1]
    if first.ok:
        return first_settings
    if not first.conclusive:  # not a crash: the load in process says what is wrong, as usual
        return first_settings
    host = Host.current()
    if not used.ok and used.conclusive:
        raise ModelLoadError(crash_paragraph(path, first, host, None),
                             "run `edgemed devices check MODEL` for the details; report the build line above")
    if not used.ok:  # a safer mode was inconclusive: try it in process, where its error reads as usual
        return used_settings
    if auto_fell_back(load, tried):  # the fallback is the default on such a build, not news: said at INFO
        level, notice = logging.INFO, (f"this llama.cpp build's AMX kernels crash ({first.signal}) on this host; "
                                       f"'{path.name}' uses extra_buffers = \"repack\" (CPU_REPACK)."
                                       f"{amx_hint(first, host)}")
    else:
        level, notice = logging.WARNING, (crash_paragraph(path, first, host, used.mode)
                                          + f" edgemed uses extra_buffers = \"{used.mode}\" now.")
    if notice not in _said:
        _said.add(notice)
        log.log(level, notice)
    return used_settings


def admit(path: Path, load: LoadSettings, adapters) -> None:
    """Before LoRA ``adapters`` join a model already loaded in process with ``load`` (``POST /admin/adapters``):
    the host's verdict for the model with that whole adapter set (cached, else a child decodes with them applied),
    in ``load``'s extra-buffer mode only (the loaded model cannot switch). A native crash raises ``ModelLoadError``;
    a pass or an inconclusive verdict (a file llama.cpp refuses: the load in process says why) returns."""
    if os.environ.get(env.SELFTEST_CHILD_VAR) == "1" or os.environ.get(env.SELFTEST_VAR) == "0":
        return
    (_, verdict), = check(path, load, adapters=adapters, fallback=False)
    if verdict.ok or not verdict.conclusive:
        return
    names = ", ".join(Path(a.path).name for a in adapters)
    raise ModelLoadError(
        f"The host self-test crashed ({verdict.signal}) loading '{Path(path).name}' with the adapters {names} applied "
        f"(extra_buffers = \"{verdict.mode}\"); the adapter was not loaded and the server serves as before.",
        f"run `edgemed devices check {path} --adapter FILE` for the details; where a safer extra_buffers passes, "
        "set it in the device profile and restart the server with --adapter FILE")


def _child(path: str, settings_json: str, adapters_json: str = "[]") -> None:
    """Runs in the child: load, apply the adapters, decode, print one JSON line (no prompt or output text): the
    placement in words, and ``offload_unread``, why layers asked for the GPU run on the CPU (``Placement.offload_unread``:
    a build that cannot offload, or weights that reached no GPU buffer), null where nothing contradicts the ask."""
    from edgemed.runtime import llamacpp

    load = LoadSettings(**{k: (tuple(v) if k == "providers" else v) for k, v in json.loads(settings_json).items()})
    fault = os.environ.get(env.FAULT_VAR, "")
    if fault and fault == f"selftest-crash:{load.extra_buffers}":
        os.kill(os.getpid(), signal.SIGSEGV)  # fault injection for the tests: a real native-style death
    model = llamacpp.Model(Path(path), load)
    ctx = llamacpp.Context(model, load, n_ctx=128, n_batch=64, threads=1)
    adapters = [(llamacpp.Adapter(model, p), float(scale)) for p, scale in json.loads(adapters_json)]
    if adapters:
        ctx.set_adapters(adapters)
    tokens = model.tokenize(CHECK_PROMPT, add_special=True)[:64]
    ctx.eval(tokens)
    pos = len(tokens)
    for _ in range(DECODE_TOKENS):
        token = int(ctx.logits(-1).argmax())
        ctx.eval([token], pos)
        pos += 1
    print(json.dumps({"ok": True, "decoded": DECODE_TOKENS, "placement": model.placement.describe(),
                      "offload_unread": model.placement.offload_unread(),
                      "adapters": len(adapters), "core_limit": _core_limit()}), flush=True)
    ctx.close()
    for adapter, _ in adapters:
        adapter.close()
    model.close()


def _core_limit() -> int | None:
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_CORE)[0]
    except (ImportError, ValueError, OSError):
        return None


if __name__ == "__main__":
    from edgemed.phi import no_core_dumps

    # the child's crash is what the check looks for: no core file of a model-sized process lands in edgemed's folder
    # (the child's working folder) or the system's crash collector (systemd-coredump honours the limit)
    no_core_dumps(quiet=True)
    _child(*sys.argv[1:4])
