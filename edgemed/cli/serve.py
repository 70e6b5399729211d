"""``edgemed serve`` (an OpenAI-compatible server) and ``edgemed audit verify`` (its hash-chained audit log)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgemed.cli import json_flag
from edgemed.cli.serving import CTX_PER_SLOT, DEFAULT_SLOTS, SLOTS, adapters_to_serve


_NOT_GGUF = "convert it with `edgemed convert ... --quant q4_k_m`"
#: Seconds a stop signal leaves running answers to finish; those still running ``GRACE_MARGIN_S`` before its end are
#: ended by the batcher (a 503 ``unavailable`` event, and an audit record saying so). A request still running
#: ``GRACE_MARGIN_S`` after the batcher has closed (a client that stopped reading) is cancelled, and recorded so.
GRACE_S, GRACE_MARGIN_S = 10, 2


class _Stopped(Exception):
    """SIGTERM (systemd's and Docker's stop), raised where uvicorn re-raises it once it has shut down."""


def _stopped(signum, frame):
    raise _Stopped()


def _stopping_server(uvicorn):
    """uvicorn's ``Server`` that, at the first stop signal, gives running answers the grace period less a margin and
    then calls ``on_stop`` (the batcher's close: what is left ends with a 503 event and its audit record), so no
    client is cut off without a word and no request goes unrecorded.

    uvicorn's own deadline (``timeout_graceful_shutdown``) is off: it cancelled running answers at a fixed time,
    whether or not the batcher had ended them yet (a decode step on a loaded machine can take seconds), so a client
    was cut off with no error event and the request's record, written after the log's stop record, said ``ok``.
    Here the requests still running ``GRACE_MARGIN_S`` after ``on_stop`` returned are cancelled, and uvicorn waits
    for every request to end (its record written) before the lifespan writes the stop record."""
    import asyncio
    import logging
    import threading
    import time

    log = logging.getLogger(__name__)

    class Server(uvicorn.Server):
        def __init__(self, config, on_stop):
            super().__init__(config)
            self._on_stop, self._timer, self._loop = on_stop, None, None

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()  # the timer thread cancels what is left through it
            await super().startup(sockets=sockets)

        def handle_exit(self, sig, frame):
            if self._timer is None:
                self._timer = threading.Timer(max(0, GRACE_S - GRACE_MARGIN_S), self._stop_answers)
                self._timer.daemon = True
                self._timer.start()
            super().handle_exit(sig, frame)

        def _stop_answers(self) -> None:
            try:
                self._on_stop()
            except Exception:  # noqa: BLE001 - a timer thread: say it here, uvicorn's own shutdown goes on
                log.exception("ending the running answers at shutdown failed")
            deadline = time.monotonic() + GRACE_MARGIN_S  # for their last events and audit records to go out
            while self.server_state.tasks and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.server_state.tasks and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._cancel_left)
                except RuntimeError:  # the loop is closed: nothing is left to cancel
                    pass

        def _cancel_left(self) -> None:
            tasks = list(self.server_state.tasks)
            if tasks:
                log.warning("%d request(s) still running %d s after the answers were ended at shutdown (a client not "
                            "reading its answer) are cancelled", len(tasks), GRACE_MARGIN_S)
            for task in tasks:
                task.cancel(msg="edgemed serve is stopping")

        def stopped(self) -> None:
            """The server has shut down: the timer's work is the caller's ``finally`` now."""
            if self._timer is not None:
                self._timer.cancel()

    return Server


@click.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --api-key-file.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--slots", default=DEFAULT_SLOTS, show_default=True, type=SLOTS,
              help="Requests generated at once (continuous batching).")
@click.option("--queue", "queue_size", default=16, show_default=True, type=click.IntRange(0, 4096),
              help="Requests that may wait for a slot; beyond slots + queue the server answers 429 with Retry-After.")
@click.option("--prefill-chunk", type=click.IntRange(1, 65536), help="Prompt tokens a step takes while other requests "
              "generate. Default: sized from measured step costs, so running streams slow by at most about 2x "
              "while a long prompt is read; larger gives that prompt its first token sooner.")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Reuse the KV of the prompt prefix a slot already holds (a chat's earlier turns): only the new "
              "tokens are computed. --no-prefix-cache computes every prompt from its first token.")
@click.option("--prefix-cache-mib", type=click.IntRange(0), metavar="N",
              help="Host RAM, MiB, that saved prompt prefixes may hold when slots turn over (0: none). Default: the "
              "device profile's memory.prefix_cache_mib, reduced to what the memory budget leaves; N is counted by "
              "the memory plan before the context is chosen, and refused if it cannot fit.")
@click.option("--prefix-cache-scope", type=click.Choice(["key", "shared"]), default="key", show_default=True,
              help="Who reuses whose prompt prefixes. key: only requests with the same API key (one clinician's "
              "prompt is never served to, or timed by, another key's request; without --api-key-file every request "
              "has the same key). shared: every request, so clinicians with keys of their own share a template's "
              "preamble, and each can tell from cached_tokens or timing whether another sent a prompt that starts "
              "the same way. A request's cache_salt narrows its scope further.")
@click.option("--profile", help="Device profile (default: detected; see `edgemed devices list`).")
@click.option("--ctx", "n_ctx", type=CTX_PER_SLOT, help="Context per request (prompt + answer), tokens. "
              "Default: the largest the memory budget allows, split over the slots.")
@click.option("--threads", type=int, help="CPU threads (default: the profile's).")
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File of accepted API keys, one per line ('KEY' or 'LABEL KEY'). Required off loopback.")
@click.option("--admin-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File of keys for the admin calls (adding and removing adapters while serving), in the format of "
              "--api-key-file and with keys of their own; they also read /metrics. Without it, a server with "
              "--api-key-file takes no admin calls, and one without keys takes them from this machine only.")
@click.option("--metrics-key-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File of keys that read /metrics (Prometheus) and nothing else, for the monitoring system's "
              "scraper; in the format of --api-key-file and with keys of their own. Given this file or "
              "--api-key-file, /metrics takes only the keys of this file and of --admin-key-file (a clinician's key "
              "is refused, 403); a server with neither serves it to this machine's clients without a key.")
@click.option("--audit-log", type=click.Path(path_type=Path, dir_okay=False),
              help="Hash-chained audit log (JSONL). Default: $EDGEMED_HOME/audit/<model>.jsonl.")
@click.option("--audit-rotate-mib", type=click.IntRange(1, 1 << 20),
              help="Start a new audit file when the log reaches this many MiB; the full one is kept beside it as "
                   "STEM.SEQ.jsonl and the chain goes on across files (`edgemed audit verify` follows it). Default: "
                   "one file. Do not rotate it with logrotate's copytruncate: that breaks the chain.")
@click.option("--audit-content", is_flag=True, help="Also write each prompt and answer into the audit log. "
              "Off by default: they may hold PHI; turn on only where policy requires it.")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browser pages from this origin "
              "(repeatable, e.g. https://ehr.example.org). Default: no CORS at all.")
@click.option("--max-body", default=1 << 20, show_default=True, type=int, help="Largest request body, bytes (413 beyond).")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(1), help="Most tokens one request may ask for "
              "(default: what fits the context).")
@click.option("--default-max-tokens", default=512, show_default=True, type=click.IntRange(1),
              help="max_tokens for chat requests that name none.")
@click.option("--think-cap", type=click.IntRange(1), metavar="N",
              help="Reasoning models: at most N tokens of a chat answer's <think> block, then the server closes it and "
              "asks for the answer (as run --think cap:N); a request's think_cap overrides it. Default: no cap.")
@click.option("--adapter", "adapter_args", multiple=True, metavar="NAME|FILE[:SCALE]",
              help="Serve this LoRA adapter for MODEL (repeatable): the NAME of one in MODEL's bundle or an installed "
              "adapter bundle for it, or a GGUF adapter file (served under its file name without .lora.gguf). "
              "Default: every adapter of MODEL's bundle and of the installed adapter bundles for it. Requests pick one "
              "with model MODEL:NAME; adapters can be added and removed while serving (POST/DELETE /admin/adapters).")
@click.option("--adapter-turn", type=click.IntRange(1, 1024), metavar="STEPS",
              help="When requests for several adapters run at once, the steps one adapter's requests decode before "
              "the next adapter's take over (1: every adapter every step). Each change of adapter costs llama.cpp a "
              "re-plan of its compute graph; longer turns spend less on it and deliver tokens in longer bursts. Default: 16.")
@click.option("--no-adapters", is_flag=True, help="Serve the base model alone, none of its adapters.")
@click.option("--no-ui", is_flag=True, help="Do not serve the clinician page at / (the API alone). The page is also "
              "off whenever the server listens off loopback without API keys.")
def serve(model, host, port, slots, queue_size, prefill_chunk, prefix_cache, prefix_cache_mib, prefix_cache_scope, profile, n_ctx, threads, api_key_file, admin_key_file, metrics_key_file, audit_log, audit_rotate_mib, audit_content,
          cors_origins, max_body, max_tokens_limit, default_max_tokens, think_cap, adapter_args, adapter_turn, no_adapters, no_ui):
    """Serve MODEL (an installed bundle's name, a bundle directory or a .gguf) over OpenAI's HTTP API.

    Any OpenAI client works with base_url=http://127.0.0.1:8080/v1: /v1/chat/completions and
    /v1/completions (streaming or not), /v1/models; /health and /metrics (Prometheus) beside them
    (/metrics, on a server with keys: a key of --metrics-key-file or --admin-key-file, not a clinician's).
    A clinician opens http://127.0.0.1:8080/ in a browser: chat, the medical templates as forms, the
    model card; served from the package, nothing loaded from elsewhere (--no-ui turns it off).
    Extra request fields: "template" + "template_inputs" (medical templates, see `edgemed run --help`),
    "grammar" (GBNF); response_format json_schema / json_object constrain the output.

    Listens on 127.0.0.1 unless --host says otherwise, and then only with --api-key-file. Every
    /v1 request is written to a hash-chained audit log without its text; check it with
    `edgemed audit verify`, and keep the head hash printed at start and stop somewhere else.
    """
    import contextlib
    import logging

    from edgemed import env
    from edgemed.errors import InputError, require
    from edgemed.formats.sniff import model_format
    from edgemed.packaging.ref import adapter_specs, loaded_as_verified, runnable, with_digest
    from edgemed.runtime.plan import check_threads
    from edgemed.runtime.session import check_prefix_cache
    from edgemed.serve.config import check_options
    from edgemed.serve.security import ApiKeys, bind_socket

    check_threads(threads, "--threads")
    from edgemed.phi import no_core_dumps

    no_core_dumps()  # a crash must not write prompts, answers or the prefix cache to a core file
    check_prefix_cache(prefix_cache, prefix_cache_mib)  # plan_load's own check, made before anything is opened
    keys = ApiKeys.from_file(api_key_file) if api_key_file else None
    admin_keys = ApiKeys.from_file(admin_key_file) if admin_key_file else None
    metrics_keys = ApiKeys.from_file(metrics_key_file) if metrics_key_file else None
    check_options(host, keys, admin_keys, max_body, prefix_cache_scope, tuple(cors_origins),  # before anything is made
                  metrics_keys)
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    require("prometheus_client", "serve")

    from edgemed.runtime.session import admit_adapter, prepare
    from edgemed.serve.app import AccessLogPaths, create_app
    from edgemed.serve.audit import AuditLog
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.serve.config import ServeConfig
    from edgemed.runtime.sampling import check_template_grammar
    from edgemed.templates import load_templates

    # Bound first: a taken port (or an address not of this machine) is refused before any model loads,
    # and no other process can take the port between this check and uvicorn's start.
    with contextlib.closing(bind_socket(host, port)) as sock:
        port = sock.getsockname()[1]  # the port the system chose for --port 0
        templates = load_templates()  # a broken template folder is refused before any model loads
        for template in templates.values():
            check_template_grammar(template)
        ref = runnable(model)  # packaging.ref, the one resolver of MODEL: a bundle is verified first
        if not ref.model_path.is_file() and model_format(ref.model_path) != "gguf":  # a missing path raises here
            raise InputError(f"'{ref.model_path}' is not a GGUF model; edgemed serve runs GGUF models (llama.cpp).",
                             _NOT_GGUF)
        ref = with_digest(ref)  # the audit's identity: a bundle's manifest sha256, else the file's own
        path, model_id, digest = ref.model_path, ref.name, ref.digest
        _refuse_audit_path(Path(audit_log or env.home() / "audit" / f"{model_id}.jsonl"),
                           ref.path if ref.path is not None and ref.path.is_dir() else None)
        card = _card(ref)
        served_adapters = adapters_to_serve(ref, adapter_args, no_adapters)  # name -> AdapterSpec, checked before any load
        prepared = prepare(path, profile, n_ctx=n_ctx, threads=threads,  # n_ctx per slot: prepare counts the slots
                           prefix_cache=prefix_cache, prefix_cache_mib=prefix_cache_mib, slots=slots, batched=True,
                           **({"adapters": list(served_adapters.values())} if served_adapters else {}))
        if prepared.plan is None:
            raise InputError(f"'{path}' is not a GGUF model; edgemed serve runs GGUF models (llama.cpp).", _NOT_GGUF)
        audit_path = audit_log or env.home() / "audit" / f"{model_id}.jsonl"
        audit = AuditLog(audit_path, content=audit_content,  # an unwritable path fails here, before the model loads
                         rotate_bytes=audit_rotate_mib << 20 if audit_rotate_mib else None)
        batcher = access = None
        import signal
        import threading

        main = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
        previous = signal.signal(signal.SIGTERM, _stopped) if main else None  # from here a stop closes what is open
        try:
            config = ServeConfig(model_id=model_id, bundle_digest=digest, host=host, port=port, api_keys=keys, admin_keys=admin_keys,
                                 metrics_keys=metrics_keys,
                                 cors_origins=tuple(cors_origins), max_body_bytes=max_body,
                                 default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit, think_cap=think_cap, audit=audit,
                                 ui=not no_ui, card=card, prefix_cache_scope=prefix_cache_scope, resolve_adapter=lambda name: adapter_specs(ref, [name], files=False)[0],
                                 admit_adapter=lambda served, spec, finishing: admit_adapter(prepared.plan, batcher.load, served, spec, finishing),
                                 loaded_adapter=lambda spec: loaded_as_verified(None, [spec]))
            batcher = Batcher(path, prepared.load, slots=slots, queue_size=queue_size, prefill_chunk=prefill_chunk,
                              prefix_cache=prefix_cache, prefix_cache_bytes=prepared.plan.estimate.prefix_cache,
                              **({"adapter_turn": adapter_turn} if adapter_turn else {}),
                              **({"adapters": served_adapters} if served_adapters else {}))
            batcher.start()
            loaded_as_verified(ref, served_adapters.values())  # what the audit names is what loaded
            app = create_app(batcher, config, templates)
            n_batch, n_ubatch = batcher.micro_batch
            click.echo(f"edgemed serve: {model_id} ({digest[:24]}...), {slots} slots x {batcher.n_ctx_per_slot} tokens, "
                       f"queue {queue_size}, profile {prepared.profile}, batches of {n_batch} in micro-batches of "
                       f"{n_ubatch}", err=True)
            click.echo(_memory_line(prepared.plan, batcher), err=True)
            click.echo(f"placement: {batcher.placement}", err=True)  # read back from llama.cpp's load lines
            if served_adapters:
                click.echo(f"adapters: {', '.join(f'{model_id}:{n}' for n in served_adapters)}", err=True)
            rotates = f"; a new file every {audit.rotate_bytes >> 20} MiB" if audit.rotate_bytes else ""
            click.echo(f"audit log {audit_path}{' (WITH prompt and output text)' if audit_content else ''}; "
                       f"head {audit.head}{rotates}", err=True)
            click.echo(f"OpenAI base_url: http://{host}:{port}/v1{'  (API key required)' if keys else ''}", err=True)
            click.echo(f"metrics: http://{host}:{port}/metrics{_metrics_access(config)}", err=True)
            if config.page_enabled:
                click.echo(f"clinician page: http://{host}:{port}/{'  (asks for an API key)' if keys else ''}", err=True)
            elif not no_ui:
                logging.getLogger(__name__).warning("clinician page off: %s is not loopback and the server has no API "
                                                    "keys (pass --api-key-file to serve it)", host)
            if not config.loopback:
                click.echo("warning: plain HTTP off loopback: keys, prompts and answers cross the network unencrypted; "
                           "put a TLS-terminating proxy in front, or keep --host 127.0.0.1", err=True)
            level = logging.getLogger().getEffectiveLevel()
            # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from any loopback client as the client's
            # address, so a local page or process could write what it liked into the audit record's "client"
            from uvicorn.protocols.http.auto import AutoHTTPProtocol

            from edgemed.serve.transport import header_deadline, raise_open_files_limit

            files = raise_open_files_limit()
            if files is not None:
                logging.getLogger(__name__).info("open files limit %d (hard %d)", *files)
            server = _stopping_server(uvicorn)(uvicorn.Config(
                app, host=host, port=port, log_level=logging.getLevelName(min(level, logging.INFO)).lower(),
                access_log=True, proxy_headers=False, server_header=False, timeout_graceful_shutdown=None,
                http=header_deadline(AutoHTTPProtocol)),  # a client that never finishes its request head is let go
                on_stop=lambda: _stop_answers(app, batcher))
            access = AccessLogPaths(app)
            logging.getLogger("uvicorn.access").addFilter(access)
            try:
                server.run(sockets=[sock])
            except (KeyboardInterrupt, _Stopped):  # uvicorn re-raises the SIGINT or SIGTERM it handled, once stopped
                pass
            finally:
                server.stopped()
            if not server.started:
                raise SystemExit(3)  # uvicorn logged why (as `uvicorn.run` would exit)
        except _Stopped:  # SIGTERM while the model loaded: what is open closes below, and the exit is a clean one
            click.echo("edgemed serve: stopped (SIGTERM) before serving", err=True)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            if access is not None:
                logging.getLogger("uvicorn.access").removeFilter(access)
            if batcher is not None:
                batcher.close()
            click.echo(f"audit log {audit_path}: head {audit.head} (record it elsewhere)", err=True)
            audit.close()


def _stop_answers(app, batcher) -> None:
    """The grace period is over: a stream cut from now on is the server's doing (``Served.stopping``), and the
    batcher ends every answer still running ("cancelled": a 503 ``unavailable`` event and its audit record)."""
    app.state.served.stopping.set()
    batcher.close()


def _metrics_access(config) -> str:
    """Who may read /metrics, for the start-up line (a server with clinicians' keys and no metrics or admin keys
    answers no one there: said here, not found out from a failing scrape)."""
    if not config.metrics_keyed:
        return ""
    if config.metrics_keys is None and config.admin_keys is None:
        return ("  (no key reads it: a clinician's key is refused; pass --metrics-key-file for the monitoring "
                "system's scraper)")
    return "  (a key of --metrics-key-file or --admin-key-file required)"


def _refuse_audit_path(audit_path: Path, bundle: Path | None) -> None:
    """The audit log may not go into edgemed's store or the bundle being served: the bundle would then hold a file
    its manifest does not list (it no longer verifies), and `edgemed remove` would delete the log with the model."""
    from edgemed.errors import InputError, OutputExists
    from edgemed.files.atomic import inside, refuse_store

    fix = "pass --audit-log with a path outside edgemed's store and the model's bundle (default: $EDGEMED_HOME/audit/)"
    try:
        refuse_store(audit_path)
    except OutputExists as exc:
        raise InputError(f"The audit log '{audit_path}' would be inside edgemed's store, which only install, remove, "
                         "rollback and pull change.", fix) from exc
    if bundle is not None and inside(audit_path, bundle):
        raise InputError(f"The audit log '{audit_path}' would be inside the bundle '{bundle}' being served.", fix)


def _memory_line(plan, batcher) -> str:
    """The memory plan in one line, with the host prefix cache the batcher was given (and why, when it is less
    than asked)."""
    from edgemed.runtime.plan import MIB

    e = plan.estimate
    got = batcher.prefix_cache_bytes
    if not batcher.prefix_cache:
        cache = "prefix cache off (--no-prefix-cache)"
    else:
        cache = f"prefix cache {got / MIB:.0f} MiB host RAM"
        if got < plan.prefix_cache_asked:
            cache += (f" (reduced from {plan.prefix_cache_asked / MIB:.0f} MiB: what the budget leaves after the model "
                      "and its context)")
    adapters = f", adapters {e.adapters / MIB:.0f}" if e.adapters else ""
    return (f"memory plan: {e.total / MIB:.0f} of {plan.budget / MIB:.0f} MiB (weights {e.weights / MIB:.0f}, KV "
            f"{e.kv_cache / MIB:.0f}, compute {e.compute / MIB:.0f}{adapters}); {cache}")


def _card(ref) -> dict:
    """The model card of a verified bundle (its manifest's "card"), for the page, with the model's license (the
    manifest's ``model.license``, from the model's own metadata) as ``license``; a plain model file has none."""
    from edgemed.packaging.manifest import MANIFEST
    from edgemed.packaging.ref import DIRECTORY, STORE

    if ref.kind not in (DIRECTORY, STORE) or ref.path is None:
        return {}
    try:
        manifest = json.loads((Path(ref.path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # verified a moment ago: unreadable now means it changed under us; the page says "no card"
    card = manifest.get("card")
    card = dict(card) if isinstance(card, dict) else {}
    model = manifest.get("model")  # a verified manifest: both are objects, when there
    license_id = model.get("license") if isinstance(model, dict) else None
    if isinstance(license_id, str) and license_id.strip():
        card["license"] = license_id
    return card


#: ``audit verify``'s exit code when nothing was checked (1: the log is broken)
UNCHECKED = 2


def _duration(seconds: float) -> str:
    """How far a record's time is from the one before's, in words: "400 days before", "10 years after"."""
    span, where = abs(seconds), "before" if seconds < 0 else "after"
    for unit, size, shown in (("years", 365.25 * 86400, 2), ("days", 86400, 1), ("hours", 3600, 1),
                              ("minutes", 60, 1)):
        if span >= shown * size:
            return f"{span / size:.{1 if unit == 'years' else 0}f} {unit} {where}"
    return f"{span:.1f} s {where}"


@click.group()
def audit():
    """Check the hash-chained audit log written by `edgemed serve`."""


@audit.command("verify")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--anchor", help="A head hash recorded earlier (64 hex digits): that record must still be in the "
              "chain (detects records cut from the end, or a rewritten log).")
@click.option("--no-follow", is_flag=True, help="With a rotated log: check PATH alone, not the kept files before it.")
@json_flag("Print the report as one JSON object.")
def verify(path, anchor, no_follow, as_json):
    """Verify every record of the audit log at PATH: hashes, chain, sequence.

    A log rotated by `serve --audit-rotate-mib` is checked through the kept files before PATH, back to its first
    record. Prints the head hash: record it elsewhere, and pass it later as --anchor. Also named, without failing:
    where the disk filled, record times that step back or jump ahead (the server's clock was set), and request
    records written after a stop record of the server.

    \b
    Exit codes:
      0  the chain is intact
      1  a record was edited, deleted, reordered or truncated (the first broken line is named)
      2  nothing was checked: PATH is missing, unreadable or not a file, or an option is wrong
    With --json, stdout holds one JSON document in every case: the report, or for exit code 2 the error
    ({"ok": false, "error": ..., "problem": ..., "fix": ...}).
    """
    from edgemed.cli import _JSON_PRINTED, _json_failure, _printable
    from edgemed.errors import InputError
    from edgemed.serve.audit import verify as verify_log

    try:
        report = verify_log(path, anchor=anchor, follow=not no_follow)
    except InputError as exc:  # not a verdict on the log: a path or an anchor to fix (exit 1 is a broken log)
        ctx = click.get_current_context()
        _json_failure(ctx, exc)
        ctx.meta[_JSON_PRINTED] = True
        unchecked = click.ClickException(_printable(exc))
        unchecked.exit_code = UNCHECKED
        raise unchecked from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        where = f" in {len(report.files)} files" if report.files else ""
        click.echo(f"OK: {report.records} records{where}, chain intact.\nhead {report.head}")
        for cut in report.torn or []:
            click.echo(f"line {cut['line']} of {cut['path']} is a record cut short ({cut['bytes']} bytes, sha256 "
                       f"{cut['sha256']}): a kill, or a full disk, while the server wrote it; that file is kept as it "
                       "was, and the genesis of the file after it records those bytes")
        for full in report.disk_full or []:
            click.echo(f"seq {full['seq']} ({full['time']}) of {full['path']}: the log's disk was full; the server "
                       f"refused new requests from there, and wrote the end records of the {full['open_requests']} "
                       "generation(s) it was answering from its reserve")
        for jump in report.time_jumps or []:
            click.echo(f"warning: record seq {jump['seq']} of {jump['path']} is dated {jump['time']}, "
                       f"{_duration(jump['seconds'])} the record before it ({jump['previous_time']}): the server's "
                       "clock was set (the chain is intact; read the times around it with care)")
        for late in report.after_stop or []:
            click.echo(f"warning: record seq {late['seq']} of {late['path']} ({late['kind']}, request id "
                       f"{late['request_id']}) comes after the server's stop record (seq {late['stop_seq']}): the "
                       "server went on with that request, or recorded it, after it logged that it had stopped "
                       "(the chain is intact; its outcome may not be what the client got)")
        if report.unfinished:
            why = "the server stopped while they ran: a crash or a kill"
            if report.disk_full:
                why = ("the log's disk filled while they ran: their end records did not fit, or the server stopped "
                       "before writing them")
            click.echo(f"{report.unfinished} generation(s) accepted with no record of their end ({why}), e.g. request "
                       f"id {', '.join(report.unfinished_ids or [])}")
        if report.in_flight:
            click.echo(f"{report.in_flight} generation(s) accepted with no record of their end yet: the server writing "
                       "this log is running, and may still be answering them")
    else:
        click.echo(f"BROKEN at line {report.line} of {report.path} ({report.problem}): {report.detail}\n"
                   f"{report.records} records verified before it; last good head {report.head}", err=True)
    if not report.ok:
        raise SystemExit(1)
