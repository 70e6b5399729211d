"""Which weights answered: the audit log names each served adapter by its file's sha256 and its scale, not by its name
alone (a name removed and added again with another file, or the same file at another scale, answers otherwise); and
``/admin/adapters`` refuses in words for an HTTP caller, with a ``code`` and the body field at fault in ``param``.

Real pieces: the F16 SmolLM2 base and real LoRA adapter files (``test_serve_adapters``' kit), a real uvicorn server, a
real audit log, and the CLI's own lookup of installed adapters (``packaging.ref.adapter_specs``, names only).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

import lora_gguf_kit  # noqa: E402
from serve_kit import ServerThread, audit_lines, collect, wait_until  # noqa: E402
from test_serve_adapters import kit  # noqa: E402,F401  (the module fixture: base + adapter files, cached)

from edgemed.files.hashing import file_sha256  # noqa: E402
from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from edgemed.runtime.engine import GenerationSettings, LoadSettings  # noqa: E402
from edgemed.runtime.loader import AdapterSpec  # noqa: E402
from edgemed.serve.audit import AuditLog, verify  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-base"
PROMPT = "The patient presents with chest pain and"


@pytest.fixture(scope="module")
def server(kit, tmp_path_factory):  # noqa: F811
    from edgemed.packaging.ref import adapter_specs, runnable
    from edgemed.serve.app import create_app

    audit_path = tmp_path_factory.mktemp("adapter-audit") / "audit.jsonl"
    batcher = Batcher(kit["base"], LoadSettings(n_ctx=512 * 2, n_threads=1, n_threads_batch=1), slots=2, queue_size=4,
                      adapters={"cardio": AdapterSpec(kit["cardio"]), "triage": AdapterSpec(kit["triage"], 0.5)})
    batcher.start()
    log = AuditLog(audit_path)
    config = ServeConfig(model_id=MODEL, bundle_digest="sha256:test", audit=log,  # as `edgemed serve` looks them up
                         resolve_adapter=lambda name: adapter_specs(runnable(str(kit["base"])), [name], files=False)[0])
    try:
        with ServerThread(create_app(batcher, config)) as srv:
            srv.batcher, srv.audit_path = batcher, audit_path
            yield srv
    finally:
        batcher.close()
        log.close()


def _ask(server, adapter: str) -> str:
    r = httpx.post(server.url + "/v1/completions", json={"model": f"{MODEL}:{adapter}", "prompt": PROMPT,
                                                         "max_tokens": 6, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"]


def _records(server, request_id: str, kinds: tuple = ("request",)) -> list[dict]:
    """The request's audit records, once its ``kinds`` are all there (the last is written after the response)."""
    def found():
        return [r for r in audit_lines(server.audit_path) if r.get("request_id") == request_id]

    assert wait_until(lambda: [r["kind"] for r in found()][-len(kinds):] == list(kinds))
    return found()


def test_the_audit_names_the_weights_an_adapter_name_stood_for(server, kit):  # noqa: F811
    """The start record lists the adapters served with their sha256 and scale; requests, and the admin calls that
    remove and add, carry them beside the name. After DELETE cardio and POST cardio with radio's file at scale 2,
    requests to MODEL:cardio are recorded with radio's sha256 and scale 2, not as before."""
    sha = {name: file_sha256(kit[name]) for name in ("cardio", "triage", "radio")}
    start = next(r for r in audit_lines(server.audit_path) if r["kind"] == "start")
    assert start["adapters"] == [{"name": "cardio", "sha256": sha["cardio"], "scale": 1.0},
                                 {"name": "triage", "sha256": sha["triage"], "scale": 0.5}]
    listed = httpx.get(server.url + "/admin/adapters").json()
    assert {n: (a["sha256"], a["scale"]) for n, a in listed["adapters"].items()} == \
        {"cardio": (sha["cardio"], 1.0), "triage": (sha["triage"], 0.5)}

    before = _records(server, _ask(server, "cardio"), ("accepted", "request"))
    assert all((r["adapter"], r["adapter_sha256"], r["adapter_scale"]) == ("cardio", sha["cardio"], 1.0) for r in before)

    removed = httpx.delete(server.url + "/admin/adapters/cardio")
    assert removed.status_code == 200 and removed.json()["sha256"] == sha["cardio"]
    added = httpx.post(server.url + "/admin/adapters", json={"name": "cardio", "path": str(kit["radio"]), "scale": 2})
    assert added.status_code == 200, added.text
    assert (added.json()["sha256"], added.json()["scale"]) == (sha["radio"], 2.0)
    admin = [_records(server, r.headers["x-request-id"])[0] for r in (removed, added)]
    assert [(r["adapter"], r["adapter_sha256"], r["adapter_scale"], r["status"]) for r in admin] == \
        [("cardio", sha["cardio"], 1.0, 200), ("cardio", sha["radio"], 2.0, 200)]

    after = _records(server, _ask(server, "cardio"), ("accepted", "request"))
    assert all((r["adapter"], r["adapter_sha256"], r["adapter_scale"]) == ("cardio", sha["radio"], 2.0) for r in after)
    base = _records(server, httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                                            "max_tokens": 2}).headers["x-request-id"])
    assert base and not any(k.startswith("adapter") for r in base for k in r)  # the base: no adapter fields
    assert verify(server.audit_path).ok
    assert httpx.delete(server.url + "/admin/adapters/cardio").status_code == 200  # as the module started
    assert wait_until(lambda: "cardio" not in server.batcher._adapters)
    assert httpx.post(server.url + "/admin/adapters", json={"name": "cardio", "path": str(kit["cardio"])}).status_code == 200


def test_a_name_still_finishing_is_a_409_that_says_to_wait_not_to_remove_it(server, kit):  # noqa: F811
    """DELETE triage while a request streams from it, then POST triage at once: the name is not free until that
    request ends, and it was removed already, so the answer says to wait (GET /admin/adapters lists it under
    "finishing" with its count), with a code; once the request ends, the same POST adds it."""
    body = {"model": f"{MODEL}:triage", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # generating
        removed = httpx.delete(server.url + "/admin/adapters/triage").json()
        assert removed["requests_finishing"] == 1
        finishing = httpx.get(server.url + "/admin/adapters").json()["finishing"]
        assert finishing == {"triage": {"path": str(kit["triage"]), "scale": 0.5, "sha256": file_sha256(kit["triage"]),
                                        "requests": 1}}
        r = httpx.post(server.url + "/admin/adapters", json={"name": "triage", "path": str(kit["triage"]), "scale": 0.5})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("adapter_finishing", "name")
        assert "was removed and still answers 1 running request" in error["message"]
        assert "GET /admin/adapters" in error["message"] and "remove it first" not in error["message"]
    assert wait_until(lambda: not httpx.get(server.url + "/admin/adapters").json()["finishing"])  # the stream closed
    r = httpx.post(server.url + "/admin/adapters", json={"name": "triage", "path": str(kit["triage"]), "scale": 0.5})
    assert r.status_code == 200, r.text


def _misread_adapter(base, out, *, record, widen: int = 0):
    """A LoRA adapter for ``base`` whose base record is ``record`` (an int: stored as a number, which edgemed reads as
    no record and llama.cpp as text) and whose first pair's A is ``widen`` columns wider than the base's weight: a file
    whose header does not describe what llama.cpp reads, whatever base it names."""
    import gguf
    import numpy as np

    from edgemed.formats.gguf_header import BASE_SOURCE_KEY, read_header

    rng, writer = np.random.default_rng(0), gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    (writer.add_uint32 if isinstance(record, int) else writer.add_string)(BASE_SOURCE_KEY, record)
    for i, t in enumerate(t for t in read_header(base).tensors if t.name.split(".")[-2] in lora_gguf_kit.TARGETS):
        n_in, n_out = t.dims
        writer.add_tensor(f"{t.name}.lora_a", rng.normal(0, 0.02, (4, n_in + (widen if i == 0 else 0))).astype(np.float16))
        writer.add_tensor(f"{t.name}.lora_b", rng.normal(0, 0.02, (n_out, 4)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_admin_refusals_name_their_code_and_field_in_words_for_an_http_caller(server, kit, tmp_path):  # noqa: F811
    """Each refusal of POST /admin/adapters: a status, a code, the body field in ``param``, words that never send an
    HTTP caller to a command-line option; its audit record carries the code. Nothing is added. A file that llama.cpp
    reads otherwise than its header says (a base record of another type; a tensor of another shape than the base
    record's base has) is not said to be made for another base: what was read is named."""
    from edgemed.formats.gguf_header import SOURCE_SHA_KEY, read_header

    wrong = lora_gguf_kit.adapter(kit["base"], "wrong", seed=5, base_source_sha256="ab" * 32)
    numbered = _misread_adapter(kit["base"], tmp_path / "numbered.lora.gguf", record=12345)
    ours = read_header(kit["base"]).metadata[SOURCE_SHA_KEY]
    widened = _misread_adapter(kit["base"], tmp_path / "widened.lora.gguf", record=ours, widen=8)
    cases = [  # body, status, code, param, words
        ({"name": "x", "path": str(numbered)}, 400, "adapter_not_loadable", "path",
         "edgemed.base.source_sha256 is '12345' to llama.cpp and None to edgemed"),
        ({"name": "x", "path": str(widened)}, 400, "adapter_not_loadable", "path",
         "has incorrect shape. Its header names the checkpoint this base was converted from"),
        ({"name": "x", "adapter": "nope"}, 400, "adapter_not_found", "adapter", "'nope' is not an adapter of"),
        ({"name": "x", "adapter": str(kit["radio"])}, 400, "adapter_not_found", "adapter", "is not an adapter of"),
        ({"name": "x", "path": str(tmp_path / "none.lora.gguf")}, 400, "adapter_not_found", "path", "is not a file"),
        ({"name": "x", "path": str(wrong)}, 400, "adapter_base_mismatch", "path", "made for the checkpoint abababab"),
        ({"name": "x", "path": str(kit["base"])}, 400, "adapter_not_loadable", "path", "is not a GGUF LoRA adapter"),
        ({"name": "no spaces", "path": str(kit["radio"])}, 400, "invalid_adapter_name", "name", "not a usable"),
        ({"name": "cardio", "path": str(kit["radio"])}, 409, "adapter_name_taken", "name", "DELETE /admin/adapters/cardio"),
        ({"name": "x", "path": str(kit["radio"]), "scale": 9}, 400, "invalid_scale", "scale", "from 0 to 4"),
    ]
    for body, status, code, param, words in cases:
        r = httpx.post(server.url + "/admin/adapters", json=body, timeout=120)
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["param"]) == (status, code, param), (body, r.text)
        assert words in error["message"] and "Fix: " in error["message"], error["message"]
        assert not re.search(r"--adapter(?!-only)", error["message"]), error["message"]  # the CLI's option, not the API's
        record = _records(server, r.headers["x-request-id"])
        assert [(x["status"], x["error_code"]) for x in record] == [(status, code)]
    assert set(server.batcher.adapters()) == {"cardio", "triage"}



def test_a_truncated_adapter_is_the_callers_file_and_a_merged_base_the_servers(server, kit, tmp_path):  # noqa: F811
    """A truncated file, unchanged since it was sent, is refused by the header reader as truncated: a 400 naming the
    file (it was a 409 adapter_changed, a server error, as if written while it loaded). A base with a LoRA merged in
    is the server's fault, not the adapter's: its own code, and the fix is to serve the unmerged base (it was
    adapter_base_mismatch, whose fix sent the caller after another adapter). Nothing is added."""
    from edgemed.formats.gguf_header import LORA_SHA_KEY
    from edgemed.serve.app import create_app

    short = tmp_path / "short.lora.gguf"
    short.write_bytes(kit["radio"].read_bytes()[:os.path.getsize(kit["radio"]) // 2])
    r = httpx.post(server.url + "/admin/adapters", json={"name": "short", "path": str(short)}, timeout=120)
    error = r.json()["error"]
    assert (r.status_code, error["type"], error["code"], error["param"]) == \
        (400, "invalid_request_error", "adapter_not_loadable", "path"), r.text
    assert f"'{short}' is truncated or damaged" in error["message"] and "Fix: copy the file again" in error["message"]
    assert "short" not in server.batcher.adapters()

    merged = lora_gguf_kit.rewrite(kit["base"], tmp_path / "merged.gguf", {LORA_SHA_KEY: "cd" * 32})
    with Batcher(merged, LoadSettings(n_ctx=512, n_threads=1, n_threads_batch=1), slots=1) as batcher, \
            ServerThread(create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test"))) as srv:
        r = httpx.post(srv.url + "/admin/adapters", json={"name": "radio", "path": str(kit["radio"])}, timeout=120)
        error = r.json()["error"]
        assert (r.status_code, error["code"], error["param"]) == (409, "base_has_merged_lora", "path"), r.text
        assert "The base 'merged.gguf' already has a LoRA adapter (cdcdcdcdcdcd...) merged" in error["message"]
        assert "Fix: serve the unmerged base" in error["message"] and "an adapter made for" not in error["message"]
        assert batcher.adapters() == {}

def test_an_adapter_file_is_hashed_once_and_one_changed_while_it_loads_is_not_served(kit, tmp_path, monkeypatch):  # noqa: F811
    """The sha256 is taken once, before the load (not per request; not at all where its bundle's verification gave
    it); a file replaced between that hash and the end of the load is refused, since the sha256 would name other bytes."""
    from edgemed.errors import InputError, IntegrityError
    from edgemed.files import hashing
    from edgemed.runtime import loader

    hashed, real_hash = [], hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda path: (hashed.append(path), real_hash(path))[1])
    greedy = GenerationSettings(max_tokens=2, temperature=0.0)
    with Batcher(kit["base"], LoadSettings(n_ctx=512, n_threads=1, n_threads_batch=1), slots=1) as b:
        added = b.add_adapter("cardio", AdapterSpec(kit["cardio"]))
        assert added["sha256"] == real_hash(kit["cardio"]) and hashed == [kit["cardio"]]
        for i in range(2):
            stream = b.submit(PROMPT, greedy, request_id=f"r{i}", adapter="cardio")
            assert stream.adapter == {"name": "cardio", "sha256": added["sha256"], "scale": 1.0}
            collect(stream)
        vouched = AdapterSpec(kit["triage"], sha256="0" * 64)  # its bundle's digest: its verifier checks the load
        assert b.add_adapter("triage", vouched)["sha256"] == "0" * 64 and len(hashed) == 1

        file = tmp_path / "radio.lora.gguf"
        shutil.copyfile(kit["radio"], file)
        real_load = loader.load_adapter

        def swapped_while_loading(model, spec):
            loaded = real_load(model, spec)
            other = tmp_path / "other.lora.gguf"
            shutil.copyfile(kit["cardio"], other)
            os.replace(other, file)
            return loaded

        monkeypatch.setattr(loader, "load_adapter", swapped_while_loading)
        with pytest.raises(IntegrityError, match="changed while it loaded"):
            b.add_adapter("radio", AdapterSpec(file))
        assert "radio" not in b.adapters() and "radio" not in b._adapters

        def swapped_and_misread(model, spec):  # a file replaced mid-load reads wrong: the change is what is said
            shutil.copyfile(kit["cardio"], tmp_path / "other.lora.gguf")
            os.replace(tmp_path / "other.lora.gguf", file)
            raise InputError("llama.cpp and edgemed's header reader read the adapter differently.", "copy it again")

        monkeypatch.setattr(loader, "load_adapter", swapped_and_misread)
        with pytest.raises(IntegrityError, match="changed while it loaded"):
            b.add_adapter("radio", AdapterSpec(file))
        assert "radio" not in b.adapters() and "radio" not in b._adapters


def test_a_name_removed_with_no_request_running_is_free_at_once(kit, monkeypatch):  # noqa: F811
    """DELETE then POST of one name (the file swap an operator makes) must not depend on the scheduler having freed
    the old tensors yet: the name is free when its last request ends, here at once; the tensors are freed later (here:
    at close, the scheduler being kept from it)."""
    closed = []
    with Batcher(kit["base"], LoadSettings(n_ctx=512, n_threads=1, n_threads_batch=1), slots=1) as b:
        monkeypatch.setattr(b, "_free_released", lambda: None)  # the scheduler never gets to it
        b.add_adapter("cardio", AdapterSpec(kit["cardio"]))
        old = b._adapters["cardio"]
        monkeypatch.setattr(old.adapter, "close", lambda real=old.adapter.close: (closed.append("old"), real()))
        b.remove_adapter("cardio")  # no request uses it
        added = b.add_adapter("cardio", AdapterSpec(kit["radio"]))  # at once: its name is free
        assert added["sha256"] == file_sha256(kit["radio"]) and b.finishing() == {} and closed == []
    assert closed == ["old"]


def test_the_audit_refuses_an_adapters_entry_outside_its_schema(tmp_path):
    """A start record's ``adapters`` holds name, sha256 and scale per adapter, and nothing else."""
    log = AuditLog(tmp_path / "audit.jsonl")
    try:
        log.append("start", adapters=[{"name": "cardio", "sha256": "a" * 64, "scale": 1.0}])
        for bad in ([{"name": "cardio", "sha256": "a" * 64, "scale": 1.0, "path": "/x"}], [{"name": "cardio"}], ["x"]):
            with pytest.raises(ValueError, match="adapters"):
                log.append("start", adapters=bad)
    finally:
        log.close()
    assert verify(tmp_path / "audit.jsonl").ok
