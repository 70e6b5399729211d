"""Bundles: pack, verify (full and fast path), signatures, tamper detection, the store, inspect --json.

All on a tiny synthetic GGUF (a few KB) so the whole file runs in seconds; the real
SmolLM2 round trip is in test_packaging_real.py.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import InputError, IntegrityError, SignatureError, StoreError
from edgemed.files.hashing import file_sha256
from edgemed.packaging import digest, signing
from edgemed.packaging.bundle import PackInputs, pack, verify_dir
from edgemed.packaging.digest import VerifiedCache
from edgemed.packaging.ref import resolve, runnable
from edgemed.packaging.store import Store


@pytest.fixture
def src(tmp_path):
    return kit.inputs(tmp_path / "src")


@pytest.fixture
def keys(tmp_path):
    return kit.keypair(tmp_path)


def _pack(src, out: Path, **kw) -> Path:
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name=kw.pop("name", "tiny")), out, **kw)
    return out


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# -- pack / inspect ------------------------------------------------------------------------
def test_pack_directory_and_tar_hold_same_manifest(tmp_path, src):
    d = _pack(src, tmp_path / "b.dir", as_dir=True)
    t = _pack(src, tmp_path / "b.edgemed")
    assert sorted(p.name for p in d.iterdir()) == ["LICENSE", "card.toml", "manifest.json", "model"]
    man_d = json.loads((d / "manifest.json").read_text())
    info = json.loads(_run("inspect", t, "--json").output)
    man_t = info["manifest"]
    assert man_d["files"] == man_t["files"]
    assert {f["path"] for f in man_t["files"]} == {"model/tiny.gguf", "LICENSE", "card.toml"}
    m = man_t["model"]
    assert (m["arch"], m["context_length"], m["n_layers"], m["vocab_size"], m["params"]) == ("llama", 2048, 2, 6, 6 * 8 + 2 * 8)
    assert len(m["chat_template_sha256"]) == 64 and len(m["tokenizer_sha256"]) == 64
    assert man_t["card"]["intended_use"].startswith("Exercising")
    assert info["bundle"]["form"] == "tar" and info["bundle"]["signature"]["present"] is False
    mem = man_t["memory"]
    assert set(mem["by_context"]) == {"2048"} and mem["method"] == "planner/4"
    # every shipped device profile is planned; fixed-memory profiles are checked against their budget
    from edgemed.devices.profiles import load_profiles

    assert set(mem["profiles"]) == set(load_profiles())
    nano = mem["profiles"]["jetson-orin-nano-8gb"]
    assert nano["fits"] is True and 0 < nano["bytes"] < nano["budget_bytes"]
    assert mem["profiles"]["x86-avx2"]["fits"] is None


def test_tokenizer_hash_changes_with_vocab_only(tmp_path):
    from edgemed.packaging.facts import gguf_facts

    a, _ = gguf_facts(kit.tiny_gguf(tmp_path / "a.gguf"))
    b, _ = gguf_facts(kit.tiny_gguf(tmp_path / "b.gguf", n_layers=3))
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"] and a["chat_template_sha256"] == b["chat_template_sha256"]
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "d"])  # one token differs
    w.add_token_types([3, 3, 3, 1, 1, 1])
    w.add_eos_token_id(2)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    c, _ = gguf_facts(tmp_path / "c.gguf")
    assert c["tokenizer_sha256"] != a["tokenizer_sha256"]


def test_pack_reads_provenance_from_gguf_and_report(tmp_path):
    src = kit.inputs(tmp_path / "src", extra_kv={"edgemed.source.sha256": "ab" * 32, "edgemed.converter_version": "9.9"})
    model = src["model"]
    report = {"size_bytes": model.stat().st_size, "out_type": "q4_k_m", "source": {"path": "/build/x", "sha256": "ab" * 32},
              "lora": {"sha256": "cd" * 32}, "parity": {"top1_agreement": 0.98}, "converter": {"version": "9.9"},
              "imatrix": {"text": "medical.txt", "sha256": "ef" * 32, "tokens": 8192, "chunks": 32}}
    model.with_name(model.name + ".report.json").write_text(json.dumps(report))
    out = _pack(src, tmp_path / "b", as_dir=True)
    man = json.loads((out / "manifest.json").read_text())
    p = man["provenance"]
    assert p["source_sha256"] == "ab" * 32 and p["lora_sha256"] == "cd" * 32 and p["converter_version"] == "9.9"
    assert p["parity"] == {"top1_agreement": 0.98} and "llama-cpp-python" in p["built_with"]
    assert p["imatrix"]["sha256"] == "ef" * 32 and p["imatrix"]["text"] == "medical.txt"  # the calibration, named
    assert (out / "report.json").is_file() and "/build/x" not in json.dumps(p)


def test_pack_refuses_card_without_required_fields(tmp_path, src):
    src["card"].write_text('intended_use = "x"\n')
    r = _run("pack", src["model"], "--license", src["license"], "--card", src["card"], "-o", tmp_path / "x.edgemed")
    assert r.exit_code == 1 and "intended_users" in r.output and not (tmp_path / "x.edgemed").exists()
    src["card"].write_text(kit.CARD + 'intendd_use = "typo"\n')
    r = _run("pack", src["model"], "--license", src["license"], "--card", src["card"], "-o", tmp_path / "x.edgemed")
    assert r.exit_code == 1 and "intendd_use" in r.output


def test_pack_never_writes_over_one_of_its_inputs_force_or_not(tmp_path, src):
    """`-o` naming the signing key, the license or the model with --force used to replace that file with the bundle
    (the private key lost for good); a --dir output holding an input likewise."""
    key = tmp_path / "signer.pem"
    assert _run("keygen", key).exit_code == 0
    before = {p: p.read_bytes() for p in (key, src["license"], src["model"], src["card"])}
    base = ["pack", src["model"], "--license", src["license"], "--card", src["card"], "--name", "tiny", "--sign", key]
    for target, what in [(key, "the --sign key"), (src["license"], "the license file"), (src["model"], "the model file"),
                         (src["card"], "the card file")]:
        for form in ([], ["--dir"]):
            r = _run(*base, *form, "-o", target, "--force")
            assert r.exit_code == 1 and f"is {what} '" in r.output and "never writes over its own input" in r.output, \
                (target, form, r.output)
    made = tmp_path / "made"  # a bundle folder edgemed made (so --force may replace it), holding an input
    assert _run(*base, "--dir", "-o", made).exit_code == 0
    r = _run("pack", made / "model" / src["model"].name, "--license", src["license"], "--name", "tiny", "--dir", "-o",
             made, "--force")
    assert r.exit_code == 1 and "holds the model file" in r.output, r.output
    r = _run(*base, "--dir", "-o", src["model"].parent, "--force")  # a user's folder: left alone, its own reason
    assert r.exit_code == 1 and "left alone, even with --force" in r.output, r.output
    assert {p: p.read_bytes() for p in before} == before
    assert _run(*base, "-o", tmp_path / "ok.edgemed").exit_code == 0


def test_pack_of_a_cut_short_model_names_the_missing_bytes(tmp_path, src):
    """A partial copy used to surface the gguf library's own reshape error; now the file's shortfall is named."""
    short = tmp_path / "short.gguf"
    data = src["model"].read_bytes()
    short.write_bytes(data[: len(data) - 7])
    r = _run("pack", short, "--license", src["license"], "--name", "tiny", "-o", tmp_path / "b.edgemed")
    assert r.exit_code == 1 and "is truncated or damaged" in r.output and f"the file has {len(data) - 7}" in r.output, \
        r.output
    assert "reshape" not in r.output and not (tmp_path / "b.edgemed").exists()


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_a_file_that_changes_size_while_it_is_packed_is_named_and_nothing_is_written(tmp_path, src, monkeypatch,
                                                                                    change):
    """The tar copies the sizes hashed before: a file cut short meanwhile was tarfile's bare OSError traceback."""
    from edgemed.packaging import bundle

    real = bundle.file_sha256

    def hash_then_change(path, *a, **k):
        digest = real(path, *a, **k)
        if Path(path) == src["model"]:
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) + (-100 if change == "shrink" else 100))
        return digest

    monkeypatch.setattr(bundle, "file_sha256", hash_then_change)
    (tmp_path / "out").mkdir()
    with pytest.raises(IntegrityError, match="shrank" if change == "shrink" else "grew") as e:
        _pack(src, tmp_path / "out" / "b.edgemed")
    assert str(src["model"]) in str(e.value) and "pack again" in e.value.fix
    assert list((tmp_path / "out").iterdir()) == []


def test_killed_pack_leaves_no_output(tmp_path, src, monkeypatch):
    from edgemed.packaging import archive

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(archive, "write_tar", boom)
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        _pack(src, tmp_path / "out" / "b.edgemed")
    monkeypatch.setattr(signing, "sign", boom)  # signing dies: the directory form is fully written by then
    with pytest.raises(KeyboardInterrupt):
        _pack(src, tmp_path / "out" / "b.dir", as_dir=True, private_key=signing.load_private_key(kit.keypair(tmp_path)[0]))
    assert list((tmp_path / "out").iterdir()) == []


# -- verify: good, tampered, signed ---------------------------------------------------------
def test_verify_cli_ok_with_signature(tmp_path, src, keys):
    priv, pub = keys
    t = _pack(src, tmp_path / "b.edgemed", private_key=signing.load_private_key(priv))
    r = _run("verify", t, "--key", pub)
    assert r.exit_code == 0 and "signature valid" in r.output and "every sha256 matches" in r.output


def test_verify_of_an_installed_model_names_it_as_installed(tmp_path, src):
    """`install --name` may differ from the bundle's own name: verify says which installed copy it checked."""
    t = _pack(src, tmp_path / "b.edgemed")
    assert _run("install", t, "--name", "cardio-a").exit_code == 0
    r = _run("verify", "cardio-a")
    assert r.exit_code == 0 and r.output.startswith("OK cardio-a (bundle tiny): "), r.output
    facts = json.loads(_run("verify", "cardio-a", "--json").output)
    assert facts["installed_as"] == "cardio-a" and facts["name"] == "tiny"
    assert json.loads(_run("verify", t, "--json").output)["installed_as"] is None


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))


def test_flipping_any_byte_of_any_file_is_refused(tmp_path, src, keys):
    """Every file of a signed bundle directory, at its first, a middle and its last byte."""
    priv, pub = keys
    good = _pack(src, tmp_path / "good", as_dir=True, private_key=signing.load_private_key(priv))
    public = signing.load_public_key(pub)
    files = sorted(p for p in good.rglob("*") if p.is_file())
    assert len(files) == 5  # model, LICENSE, card.toml, manifest.json, model.sig
    cases = 0
    for f in files:
        size = f.stat().st_size
        for offset in sorted({0, size // 3, size // 2, size - 1}):
            bad = tmp_path / f"bad-{cases}"
            shutil.copytree(good, bad)
            target = bad / f.relative_to(good)
            _flip(target, offset)
            with pytest.raises(IntegrityError) as exc:
                verify_dir(bad, full=True, public_key=public)
            msg = str(exc.value)
            rel = f.relative_to(good).as_posix()
            if rel not in ("manifest.json", "model.sig"):
                entry = json.loads((good / "manifest.json").read_text())["files"]
                expected = next(e["sha256"] for e in entry if e["path"] == rel)
                assert rel in msg and expected in msg and f"actual {file_sha256(target)}" in msg, msg
            else:
                assert isinstance(exc.value, SignatureError) or "manifest" in msg, msg
            shutil.rmtree(bad)
            cases += 1
    assert cases >= 15


def test_flipping_bytes_inside_the_tar_is_refused(tmp_path, src):
    t = _pack(src, tmp_path / "b.edgemed")
    import tarfile

    with tarfile.open(t) as tf:
        members = [m for m in tf.getmembers() if m.name != "manifest.json"]
    data = t.read_bytes()
    for m in members:
        for off in sorted({0, m.size // 2, m.size - 1}):
            bad = tmp_path / "bad.edgemed"
            buf = bytearray(data)
            buf[m.offset_data + off] ^= 0x01
            bad.write_bytes(bytes(buf))
            r = _run("verify", bad)
            assert r.exit_code == 1 and m.name in r.output and "expected sha256" in r.output, r.output


@pytest.mark.parametrize("damage", ["truncate", "extend", "extra", "missing", "symlink"])
def test_incomplete_or_grown_bundle_is_refused(tmp_path, src, damage):
    b = _pack(src, tmp_path / "b", as_dir=True)
    model = b / "model" / "tiny.gguf"
    if damage == "truncate":
        os.truncate(model, model.stat().st_size - 10)
        want = "truncated"
    elif damage == "extend":
        with open(model, "ab") as fh:
            fh.write(b"x")
        want = "model/tiny.gguf"
    elif damage == "extra":
        (b / "model" / "evil.gguf").write_bytes(b"GGUF")
        want = "extra files not listed in the manifest: model/evil.gguf"
    elif damage == "missing":
        (b / "LICENSE").unlink()
        want = "'LICENSE' is listed in the manifest but missing"
    else:
        (b / "LICENSE").unlink()
        (b / "LICENSE").symlink_to("/etc/passwd")
        want = "symbolic link"
    r = _run("verify", b)
    assert r.exit_code == 1 and want in r.output, r.output


def test_signature_checks(tmp_path, src, keys):
    priv, pub = keys
    _, other_pub = kit.keypair(tmp_path, "other.pem")
    signed = _pack(src, tmp_path / "s", as_dir=True, private_key=signing.load_private_key(priv))
    unsigned = _pack(src, tmp_path / "u", as_dir=True)
    r = _run("verify", signed, "--key", other_pub)
    assert r.exit_code == 1 and "not by the given key" in r.output
    r = _run("verify", unsigned, "--key", pub)
    assert r.exit_code == 1 and "not signed" in r.output
    # a changed manifest (a card field edited) breaks the signature even though every file hash still matches
    man = json.loads((signed / "manifest.json").read_text())
    man["card"]["intended_use"] = "Diagnose everything"
    (signed / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    r = _run("verify", signed, "--key", pub)
    assert r.exit_code == 1 and "manifest was changed after signing" in r.output
    # a forged signature: the right key hint and statement, another signature value
    good = _pack(src, tmp_path / "g", as_dir=True, private_key=signing.load_private_key(priv))
    doc = json.loads((good / "model.sig").read_text())
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(b"\x30" * 70).decode()
    (unsigned / "model.sig").write_text(json.dumps(doc))
    r = _run("verify", unsigned, "--key", pub)
    assert r.exit_code == 1 and "does not verify with key" in r.output, r.output


def test_changed_manifest_hash_is_refused(tmp_path, src):
    b = _pack(src, tmp_path / "b", as_dir=True)
    man = json.loads((b / "manifest.json").read_text())
    man["files"][0]["sha256"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(man))
    r = _run("verify", b)
    assert r.exit_code == 1 and f"expected sha256 {'0' * 64}" in r.output


# -- fast path --------------------------------------------------------------------------------
def test_fast_path_reuses_digests_but_sees_same_size_rewrites(tmp_path, src, monkeypatch):
    b = _pack(src, tmp_path / "b", as_dir=True)
    fresh = verify_dir(b, cache=VerifiedCache())
    assert len(fresh.hashed) == 3
    again = verify_dir(b, cache=VerifiedCache())
    assert len(again.hashed) == 3  # files written < RACY_S ago are never trusted to the cache
    monkeypatch.setattr(digest, "RACY_S", -1e9)
    verify_dir(b, cache=VerifiedCache())
    read = []  # every file whose bytes were hashed
    real_sha256 = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda path: read.append(path) or real_sha256(path))
    fast = verify_dir(b, cache=VerifiedCache())
    assert fast.hashed == [] and read == []  # every digest came from the cache: no file was hashed
    assert len(verify_dir(b, full=True, cache=VerifiedCache()).hashed) == 3 and len(read) == 3
    # rewrite one byte in place, same size, and put mtime back: ctime still moves, so the fast path re-hashes
    model = b / "model" / "tiny.gguf"
    st = model.stat()
    time.sleep(0.02)
    _flip(model, st.st_size - 1)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="model/tiny.gguf"):
        verify_dir(b, cache=VerifiedCache())


# -- store ------------------------------------------------------------------------------------
def test_an_install_from_a_very_deep_folder_is_whole(tmp_path, src, edgemed_home, monkeypatch):
    """A bundle whose absolute path passed 4,096 characters installed, then the store set aside the journal it had
    just written (its record's 'source' too long to be one edgemed writes): `list` showed the old version, `verify`
    failed and the old copy was stranded. The source is shortened at its start instead."""
    b = _pack(src, tmp_path / "b.edgemed")
    monkeypatch.chdir(tmp_path)
    for _ in range(18):  # ~4,300 characters, reached one folder at a time (PATH_MAX bounds a single call)
        os.mkdir("d" * 240)
        os.chdir("d" * 240)
    os.link(b, "b.edgemed")
    assert len(str(Path("b.edgemed").absolute())) > 4096
    store = Store()
    name, _, _ = store.install(Path("b.edgemed"))
    rec = store.record(name)
    assert rec["source"].startswith("...") and len(rec["source"]) == 4096 and rec["source"].endswith("/b.edgemed")
    assert store.verify(name).manifest.name == "tiny"
    assert not list(store.tmp.iterdir()) and not list(store.root.glob("journal.rejected-*"))


def test_install_list_remove_shares_identical_files(tmp_path, src, edgemed_home):
    a = _pack(src, tmp_path / "a.edgemed", name="alpha")
    b = _pack(src, tmp_path / "b.edgemed", name="beta")  # same GGUF, LICENSE and card: same blobs
    assert _run("install", a).exit_code == 0
    r = _run("install", b)
    assert r.exit_code == 0 and "installed beta" in r.output
    store = Store()
    blobs = list(store.blobs.iterdir())
    assert len(blobs) == 3 and all(p.stat().st_nlink == 3 for p in blobs)  # blob + two models
    listed = json.loads(_run("list", "--json").output)
    assert [r["name"] for r in listed] == ["alpha", "beta"] and listed[0]["arch"] == "llama"
    assert runnable("alpha").model_path == store.models / "alpha" / "model" / "tiny.gguf"
    r = _run("install", a)
    assert r.exit_code == 1 and "already installed" in r.output
    assert _run("remove", "alpha").exit_code == 0
    assert len(list(store.blobs.iterdir())) == 3  # beta still uses them
    r = _run("remove", "beta")
    assert r.exit_code == 0 and list(store.blobs.iterdir()) == [] and not list(store.models.iterdir())
    r = _run("remove", "beta")
    assert r.exit_code == 1 and "No model named 'beta'" in r.output


def test_a_bundle_with_x_and_x_link_installs_again_and_like_named_templates_are_refused(tmp_path, src, edgemed_home):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "p.txt").write_text("a")
    (tpl / "p.txt.link").write_text("b")  # the name install used for its own temporary link
    base = ["pack", src["model"], "--license", src["license"], "--card", src["card"]]
    assert _run(*base, "--name", "tl", "--template", tpl / "p.txt", "--template", tpl / "p.txt.link",
                "-o", tmp_path / "tl.edgemed").exit_code == 0
    assert _run("install", tmp_path / "tl.edgemed").exit_code == 0
    r = _run("install", tmp_path / "tl.edgemed", "--name", "tl2")  # the blobs exist now: linked, not copied
    assert r.exit_code == 0, r.output
    store = Store()
    assert (store.models / "tl2" / "templates" / "p.txt.link").read_text() == "b"
    assert (store.models / "tl2" / "templates" / "p.txt").read_text() == "a"
    other = tmp_path / "other"
    other.mkdir()
    (other / "P.txt").write_text("c")
    for form in ([], ["--dir"]):
        r = _run(*base, "--name", "dup", "--template", tpl / "p.txt", "--template", other / "P.txt", *form,
                 "-o", tmp_path / f"dup{len(form)}")
        assert r.exit_code == 1 and "would both be templates/P.txt" in r.output and "rename one" in r.output, r.output
        assert not (tmp_path / f"dup{len(form)}").exists()


def test_install_checks_signature_and_changed_manifest_in_store(tmp_path, src, keys):
    priv, pub = keys
    t = _pack(src, tmp_path / "b.edgemed", private_key=signing.load_private_key(priv))
    other = kit.keypair(tmp_path, "other.pem")[1]
    r = _run("install", t, "--key", other)
    assert r.exit_code == 1 and "not by the given key" in r.output
    assert list(Store().models.iterdir()) == [] and list(Store().blobs.iterdir()) == []
    r = _run("install", t, "--key", pub)
    assert r.exit_code == 0 and "signature valid" in r.output
    man_path = Store().models / "tiny" / "manifest.json"
    man_path.chmod(0o644)
    man = json.loads(man_path.read_bytes())
    man["card"]["known_limitations"] = "none"
    man_path.write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="changed after install"):
        runnable("tiny").model_path


def test_verify_of_an_installed_model_checks_its_signature_as_run_does(tmp_path, src, keys):
    """The signature file removed (or swapped) after install: `run` refused the model, `verify NAME` said OK."""
    priv, pub = keys
    t = _pack(src, tmp_path / "b.edgemed", private_key=signing.load_private_key(priv))
    assert _run("install", t, "--key", pub).exit_code == 0
    assert _run("verify", "tiny", "--full").exit_code == 0
    sig = Store().models / "tiny" / signing.MODEL_SIG
    sig.unlink()
    r = CliRunner().invoke(cli, ["verify", "tiny", "--full"])
    assert r.exit_code == 1 and "not the one checked at install" in r.output and "now absent" in r.output, r.output
    with pytest.raises(Exception, match="not the one checked at install"):
        runnable("tiny").model_path


def test_tampered_store_file_is_refused_before_run(tmp_path, src):
    t = _pack(src, tmp_path / "b.edgemed")
    _run("install", t)
    model = Store().models / "tiny" / "model" / "tiny.gguf"
    model.chmod(0o644)
    _flip(model, 100)
    r = _run("run", "tiny", "--prompt", "hi")
    assert r.exit_code == 1 and "model/tiny.gguf" in r.output and "expected sha256" in r.output


def test_interrupted_install_leaves_nothing(tmp_path, src, monkeypatch):
    t = _pack(src, tmp_path / "b.edgemed")
    from edgemed.packaging import store as store_mod

    real = store_mod.copy_hashed
    calls = []

    def dying_copy(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # power cut / Ctrl-C half way through the bundle
        return real(*a, **k)

    monkeypatch.setattr(store_mod, "copy_hashed", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        Store().install(t)
    s = Store()
    assert list(s.models.iterdir()) == [] and list(s.tmp.iterdir()) == [] and s.index() == {}
    monkeypatch.setattr(store_mod, "copy_hashed", real)
    # a SIGKILL leaves staging debris and an unlinked blob: the next store operation clears them
    dead = s.tmp / ".install.edgemed-0123456789abcdef.deadbeef.partial"  # a killed owner's staging
    (s.tmp / ".edgemed-0123456789abcdef.lock").touch()  # and its lock, which nobody holds any more
    dead.mkdir()
    (dead / "x").write_bytes(b"partial")
    (s.blobs / ("f" * 64)).write_bytes(b"orphan")
    s.install(t)
    assert list(s.tmp.iterdir()) == [] and not (s.blobs / ("f" * 64)).exists()
    assert [r["name"] for r in s.list()] == ["tiny"]


def test_run_resolves_paths_and_names(tmp_path, src):
    assert runnable(src["model"]).model_path == src["model"]
    b = _pack(src, tmp_path / "b", as_dir=True)
    assert runnable(b).model_path == b.absolute() / "model" / "tiny.gguf"
    with pytest.raises(StoreError, match="No model named 'nope'"):
        runnable("nope").model_path
    t = _pack(src, tmp_path / "b.edgemed")
    r = _run("run", t, "--prompt", "hi")
    assert r.exit_code == 1 and f"edgemed install {t}" in r.output


def test_a_file_named_like_an_installed_model_is_never_run_in_its_place(tmp_path, src, edgemed_home, monkeypatch):
    """`edgemed run tiny` in a folder holding a file called `tiny` loaded that file: unverified, past the trust policy
    that the installed `tiny` is held to. The bare name is refused as ambiguous; ./tiny names the file."""
    Store().install(_pack(src, tmp_path / "b", as_dir=True))
    work = tmp_path / "work"
    work.mkdir()
    (work / "tiny").write_bytes(src["model"].read_bytes())
    monkeypatch.chdir(work)
    with pytest.raises(InputError, match="names both an installed model and a file") as exc:
        runnable("tiny")
    assert "./tiny" in exc.value.fix
    assert runnable("./tiny").kind == "file" and runnable(str(work / "tiny")).kind == "file"
    for cmd in ("run", "chat"):  # as typed on the command line (a click path type turned ./tiny into tiny)
        r = CliRunner().invoke(cli, [cmd, "./tiny", *(["--prompt", "hi"] if cmd == "run" else [])], input="/exit\n")
        assert "names both" not in r.output, (cmd, r.output)
        r = CliRunner().invoke(cli, [cmd, "tiny", *(["--prompt", "hi"] if cmd == "run" else [])], input="/exit\n")
        assert r.exit_code == 1 and "names both an installed model and a file" in r.output, (cmd, r.output)
    monkeypatch.chdir(tmp_path)
    assert runnable("tiny").kind == "store"
    (tmp_path / "other").write_text("x")
    assert resolve("other").kind == "file"  # a bare name nothing is installed under stays a path


def test_every_bundle_role_travels_as_a_modelpack_layer_type():
    """A role the manifest knows and the registry channel does not would push an adapter as a document."""
    from edgemed.packaging.manifest import ROLES
    from edgemed.packaging.oci import RAW_MEDIA, ROLE_MEDIA, WEIGHT_RAW

    assert set(ROLE_MEDIA) == set(ROLES) and set(ROLE_MEDIA.values()) <= RAW_MEDIA
    assert ROLE_MEDIA["model"] == ROLE_MEDIA["adapter"] == WEIGHT_RAW
