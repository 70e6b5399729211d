"""``POST /admin/adapters`` goes through the checks ``edgemed serve --adapter`` gets at start: the memory plan (what is
served plus the new adapter must fit the budget: 507 otherwise) and the host self-test for the model with the whole
adapter set (a native crash in the child: 409). A refusal loads nothing and the server serves as before.

Real pieces: the F16 SmolLM2 base and real PEFT LoRA adapter files (``test_serve_adapters``' kit), the real memory
plan of that file with its budget set just above what the server holds, a real uvicorn server, and a real child
process killed by SIGSEGV (the self-test's fault injection) for the crash.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

from serve_kit import ServerThread, wait_until
from test_serve_adapters import kit  # noqa: F401  (the module fixture: base + adapter files, cached)

from edgemed import env
from edgemed.runtime.batch.batcher import Batcher
from edgemed.runtime.batch.options import Extras
from edgemed.runtime.engine import GenerationSettings, LoadSettings
from edgemed.runtime.loader import AdapterSpec
from edgemed.runtime.plan import MIB, adapters_bytes, make_plan
from edgemed.runtime.session import admit_adapter
from edgemed.serve.config import ServeConfig

pytestmark = pytest.mark.slow

MODEL = "smollm2-base"
PROMPT = "The patient presents with chest pain and"
#: room the budget leaves beside the model and its served adapter: more than triage's tensors, less than radio's
SLACK = 3 * MIB


@pytest.fixture(scope="module")
def server(kit, tmp_path_factory):  # noqa: F811
    from edgemed.devices.profiles import get_profile
    from edgemed.serve.app import create_app

    assert adapters_bytes([kit["triage"]]) < SLACK < adapters_bytes([kit["radio"]]), "the kit's adapters changed size"
    plan = make_plan(kit["base"], get_profile("generic"), None, requested_ctx=1024, budget=1 << 40,
                     adapters=[kit["cardio"]])
    plan = dataclasses.replace(plan, budget=plan.estimate.total + SLACK)
    batcher = Batcher(kit["base"], LoadSettings(n_ctx=1024, n_threads=1, n_threads_batch=1), slots=2, queue_size=4,
                      adapters={"cardio": AdapterSpec(kit["cardio"])})
    batcher.start()
    config = ServeConfig(model_id=MODEL, bundle_digest="sha256:test",
                         admit_adapter=lambda served, spec, finishing: admit_adapter(plan, batcher.load, served, spec,
                                                                                     finishing))
    try:
        with ServerThread(create_app(batcher, config)) as srv:
            srv.batcher, srv.plan = batcher, plan
            yield srv
    finally:
        batcher.close()


def _add(server, name: str, path) -> httpx.Response:
    return httpx.post(server.url + "/admin/adapters", json={"name": name, "path": str(path)}, timeout=300)


def _answer(server, model: str) -> str:
    r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6,
                                                         "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_an_adapter_over_the_memory_budget_is_refused_with_507_and_nothing_changes(server, kit, tmp_path):  # noqa: F811
    before = _answer(server, f"{MODEL}:cardio")
    r = _add(server, "radio", kit["radio"])
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "radio.lora.gguf" in error["message"] and "over the 'generic' budget" in error["message"]
    assert "DELETE /admin/adapters/NAME" in error["message"] and "--adapter FILE" in error["message"]
    assert set(server.batcher.adapters()) == {"cardio"}
    assert _answer(server, f"{MODEL}:cardio") == before  # still serving, as before
    assert httpx.post(server.url + "/v1/completions", json={"model": f"{MODEL}:radio", "prompt": "x"}).status_code == 404

    # the smaller one fits beside cardio; a second copy of it does not (what is served is counted), until the first goes
    assert _add(server, "triage", kit["triage"]).status_code == 200
    copy = tmp_path / "triage2.lora.gguf"
    shutil.copyfile(kit["triage"], copy)
    assert _add(server, "triage2", copy).status_code == 507
    assert httpx.delete(server.url + "/admin/adapters/triage").status_code == 200
    assert _add(server, "triage2", copy).status_code == 200
    assert httpx.delete(server.url + "/admin/adapters/triage2").status_code == 200


def test_a_removed_adapter_still_finishing_requests_counts_against_the_budget(server, kit, tmp_path):  # noqa: F811
    """A removed adapter stays loaded while requests run on it, so its memory is still held: an add beside it that
    the budget has no room for is refused (507) until those requests end; before, it loaded over the budget."""
    assert _add(server, "triage", kit["triage"]).status_code == 200
    copy = tmp_path / "triage2.lora.gguf"
    shutil.copyfile(kit["triage"], copy)
    no_end = Extras(logit_bias=tuple((t, -100.0) for t in server.batcher._model.eog_ids()))  # runs its max_tokens
    held = server.batcher.submit(PROMPT, GenerationSettings(max_tokens=400), request_id="held", extras=no_end,
                                 adapter="triage")
    try:
        r = httpx.delete(server.url + "/admin/adapters/triage")
        assert r.status_code == 200 and r.json()["requests_finishing"] == 1, r.text
        r = _add(server, "triage2", copy)
        assert r.status_code == 507, r.text
        message = r.json()["error"]["message"]
        assert "1 served adapters and 1 removed ones still loaded for their running requests" in message, message
        assert "lists none under \"finishing\"" in message, message
        assert set(server.batcher.adapters()) == {"cardio"} and set(server.batcher.finishing()) == {"triage"}
    finally:
        held.cancel()
    assert wait_until(lambda: not server.batcher.finishing())
    assert _add(server, "triage2", copy).status_code == 200  # its memory is free once its last request ended
    assert httpx.delete(server.url + "/admin/adapters/triage2").status_code == 200


def test_a_self_test_crash_with_the_new_set_is_refused_with_409_and_the_server_keeps_serving(server, kit, monkeypatch):  # noqa: F811
    from edgemed.runtime import buffers
    from edgemed.runtime.llamacpp import build

    if os.environ.get(env.SELFTEST_VAR) == "0":
        pytest.skip(f"the host self-test is off ({env.SELFTEST_VAR}=0)")
    before = _answer(server, MODEL)
    mode = buffers.resolve(server.batcher.load.extra_buffers, build())
    monkeypatch.setenv(env.FAULT_VAR, f"selftest-crash:{mode}")  # the child dies by SIGSEGV in this mode
    r = _add(server, "triage", kit["triage"])
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_selftest_failed"
    assert "SIGSEGV" in error["message"] and "triage.lora.gguf" in error["message"]
    assert "edgemed devices check" in error["message"]
    assert set(server.batcher.adapters()) == {"cardio"}
    assert _answer(server, MODEL) == before
    monkeypatch.delenv(env.FAULT_VAR)
    assert _add(server, "triage", kit["triage"]).status_code == 200  # the same adapter, a host that passes
    assert httpx.delete(server.url + "/admin/adapters/triage").status_code == 200


def test_an_adapter_file_llama_cpp_does_not_load_is_a_400_and_nothing_changes(server, kit, monkeypatch):  # noqa: F811
    """It passed edgemed's header checks and the self-test's child, then llama.cpp refused it in the server: the
    caller's file to fix, answered as a 500 server failure before (an alert on 5xx fired on it)."""
    from edgemed.errors import ModelLoadError
    from edgemed.runtime import llamacpp

    def refuse(model, path):
        raise ModelLoadError(f"llama.cpp could not load the LoRA adapter '{path}'.", "check the file")

    before = _answer(server, MODEL)
    monkeypatch.setattr(llamacpp, "Adapter", refuse)
    r = _add(server, "triage", kit["triage"])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("adapter_not_loadable", "path", "invalid_request_error")
    assert "triage.lora.gguf" in error["message"] and "Fix: check the file" in error["message"]
    assert set(server.batcher.adapters()) == {"cardio"}
    assert _answer(server, MODEL) == before


def test_a_taken_or_bad_name_is_refused_before_the_self_test_runs(server, kit, monkeypatch):  # noqa: F811
    """The self-test's child (seconds) ran for the new set before the name was looked at."""
    called = []
    monkeypatch.setitem(globals(), "admit_adapter", lambda *args: called.append(args))
    for name, status, code, words in [("cardio", 409, "adapter_name_taken", "already served"),
                                      ("no spaces", 400, "invalid_adapter_name", "not a usable adapter name")]:
        r = _add(server, name, kit["triage"])
        error = r.json()["error"]
        assert r.status_code == status and words in error["message"], r.text
        assert (error["code"], error["param"]) == (code, "name")
    assert called == [] and set(server.batcher.adapters()) == {"cardio"}


@pytest.fixture(scope="module")
def roomy(kit, tmp_path_factory):  # noqa: F811
    """A server with no adapter at start and a budget with room for any, on a base of its own at ``srv.base`` (a
    hard link to the kit's, else a copy) that a test may replace on disk; ``srv.checks["admit"]``: whether an add
    goes through ``admit_adapter`` (False: straight to the load, as a server without the checks)."""
    from edgemed.devices.profiles import get_profile
    from edgemed.serve.app import create_app

    base = tmp_path_factory.mktemp("roomy") / "base.gguf"
    try:
        os.link(kit["base"], base)  # replacing this name later leaves the kit's file and its bytes as they are
    except OSError:
        shutil.copyfile(kit["base"], base)
    plan = make_plan(base, get_profile("generic"), None, requested_ctx=2048, budget=1 << 40)
    batcher = Batcher(base, LoadSettings(n_ctx=2048, n_threads=1, n_threads_batch=1), slots=1, queue_size=2)
    batcher.start()
    checks = {"admit": True}

    def admit(served, spec, finishing):
        if checks["admit"]:
            admit_adapter(plan, batcher.load, served, spec, finishing)

    config = ServeConfig(model_id=MODEL, bundle_digest="sha256:test", admit_adapter=admit)
    try:
        with ServerThread(create_app(batcher, config)) as srv:
            srv.batcher, srv.base, srv.checks = batcher, base, checks
            yield srv
    finally:
        batcher.close()


def test_a_base_file_that_no_longer_reads_is_the_servers_error_not_the_adapters(roomy, kit):  # noqa: F811
    """The base the server loaded is replaced on disk by a truncated copy, then by a file that is no GGUF: adding a
    good adapter is the server's error (500 base_unreadable, naming the base file and a restart on a good one), at
    the admit checks and at the load alike; it was the caller's 400 adapter_not_loadable, telling it to fix its
    adapter. With the base back, the same adapter is added."""
    base = roomy.base
    aside = base.with_name("base.aside")
    os.rename(base, aside)  # the loaded file (its inode) stays whole, under another name
    try:
        with open(aside, "rb") as f:
            head = f.read(1 << 20)
        for content in (head, b"not a model\n"):  # truncated, then no GGUF at all
            base.write_bytes(content)
            for checked in (True, False):  # refused by admit_adapter's checks, and by the load's own
                roomy.checks["admit"] = checked
                r = _add(roomy, "triage", kit["triage"])
                assert r.status_code == 500, r.text
                error = r.json()["error"]
                assert (error["code"], error["type"], error["param"]) == ("base_unreadable", "server_error", None)
                message = error["message"]
                assert f"The base model file '{base}'" in message and "no longer reads as a GGUF" in message, message
                assert "restart the server on it" in message and "'triage.lora.gguf' could not be checked" in message
                assert roomy.batcher.adapters() == {}
    finally:
        roomy.checks["admit"] = True
        os.replace(aside, base)
    r = _add(roomy, "triage", kit["triage"])
    assert r.status_code == 200, r.text
    assert httpx.delete(roomy.url + "/admin/adapters/triage").status_code == 200


def test_the_self_test_of_an_add_applies_the_removed_adapters_still_finishing_requests(roomy, kit, tmp_path,  # noqa: F811
                                                                                        monkeypatch):
    """A removed adapter stays loaded while requests run on it, so the set a new adapter joins includes it: the memory
    check counted it, and the host self-test's child now applies it too (it decoded with the served ones and the new
    one only, a set the server does not hold)."""
    from edgemed.runtime import selftest

    assert wait_until(lambda: not roomy.batcher.finishing())
    assert _add(roomy, "triage", kit["triage"]).status_code == 200
    copy = tmp_path / "triage2.lora.gguf"
    shutil.copyfile(kit["triage"], copy)
    tested = []
    monkeypatch.setattr(selftest, "admit", lambda path, load, adapters: tested.append((path, list(adapters))))
    no_end = Extras(logit_bias=tuple((t, -100.0) for t in roomy.batcher._model.eog_ids()))  # runs its max_tokens
    held = roomy.batcher.submit(PROMPT, GenerationSettings(max_tokens=1900), request_id="held", extras=no_end,
                                adapter="triage")
    try:
        r = httpx.delete(roomy.url + "/admin/adapters/triage")
        assert r.status_code == 200 and r.json()["requests_finishing"] == 1, r.text
        r = _add(roomy, "triage2", copy)
        assert r.status_code == 200, r.text
        assert set(roomy.batcher.finishing()) == {"triage"}, "the held request ended early: the test proves nothing"
    finally:
        held.cancel()
    assert tested == [(roomy.base, [AdapterSpec(kit["triage"]), AdapterSpec(copy)])]
    assert wait_until(lambda: not roomy.batcher.finishing())
    assert httpx.delete(roomy.url + "/admin/adapters/triage2").status_code == 200


def test_a_base_file_replaced_by_another_gguf_is_the_servers_error_not_the_adapters(roomy, kit,  # noqa: F811
                                                                                     smollm2_gguf):
    """The base the server loaded is replaced on disk by another good GGUF (SmolLM2's own Q4_1, which records no
    checkpoint): adding the kit's adapter was the caller's 400 adapter_base_mismatch, a verdict on a file the server
    does not run. It is the server's 500 base_changed, naming the change and a restart, at the admit checks and at the
    load alike (the identity of the file loaded is taken at start). With the loaded file back, the adapter is added."""
    base = roomy.base
    aside = base.with_name("base.aside")
    os.rename(base, aside)  # the loaded file stays whole under another name, and is the same file once back
    try:
        shutil.copyfile(smollm2_gguf, base)
        for checked in (True, False):  # refused before admit_adapter's checks and before the load's own
            roomy.checks["admit"] = checked
            r = _add(roomy, "triage", kit["triage"])
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert (error["code"], error["type"], error["param"]) == ("base_changed", "server_error", None)
            message = error["message"]
            assert f"The base model file '{base}' is no longer the file this server loaded" in message, message
            assert "restart the server" in message and "'triage.lora.gguf' was not checked" in message, message
            assert roomy.batcher.adapters() == {}
    finally:
        roomy.checks["admit"] = True
        os.replace(aside, base)
    r = _add(roomy, "triage", kit["triage"])
    assert r.status_code == 200, r.text
    assert httpx.delete(roomy.url + "/admin/adapters/triage").status_code == 200
