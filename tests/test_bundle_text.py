"""A bundle's text holds no character a terminal acts on: refused where it is read and where it would be made, and
escaped wherever the CLI prints it all the same.

A card field holding ESC [ 1 A ESC [ 2 K (up one line, erase it) printed by `edgemed inspect` rewrote the line above
it: the one that says "unsigned; not verified here". The manifest here is written by hand, as a hostile maker
would; good bundles are made with ``bundle_kit``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import bundle_kit as kit
from edgemed.cli import cli
from edgemed.errors import InputError, IntegrityError, UnsafeArchive
from edgemed.formats.terminal_text import control_in, shown, shown_prose
from edgemed.packaging.bundle import PackInputs, pack
from edgemed.packaging.card import load_card
from edgemed.packaging.manifest import Manifest, check_relpath
from edgemed.packaging.store import Store

PAYLOAD = b"GGUF" + bytes(range(1, 61))
#: Up one line and erase it, then a line that looks like edgemed's own
SPOOF = "\x1b[1A\x1b[2K\rtiny  (tar: tiny.edgemed; signed by key 1f2e3d4c5b6a; verified)"
HOSTILE = ["\x1b", "\r", "\x00", "\x08", "\x7f", "\x9b", "\x85", "\u202e", "\u202a", "\u2066", "\u2069"]


def _manifest(card: dict | None = None, **top) -> dict:
    entry = {"path": "model/m.gguf", "size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest(), "role": "model"}
    return {"schema": "edgemed.bundle/1", "name": "evil", "files": [entry], "model": {"format": "gguf", "path": entry["path"]},
            "provenance": {}, "card": card or {}, "memory": {}, "created": "", "edgemed_version": "0", **top}


def _tar(path: Path, man: dict) -> Path:
    """A bundle tar holding ``man`` (as JSON with ASCII escapes, as any JSON writer may send it) and the model file."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", json.dumps(man).encode()), ("model/m.gguf", PAYLOAD)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _cli(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_card_that_rewrites_the_signature_line_is_refused_by_every_command(tmp_path):
    """inspect printed the card after the line "evil (tar: ...; unsigned; not verified here ...)", and a terminal
    obeyed the ESC sequences in it: the line was erased and replaced by one saying signed and verified."""
    bundle = _tar(tmp_path / "evil.edgemed", _manifest({"intended_use": "Triage. " + SPOOF, "intended_users": ["nurses"]}))
    for args in (["inspect"], ["inspect", "--json"], ["verify"], ["install"]):
        r = _cli(*args, bundle)
        assert r.exit_code == 1, (args, r.output)
        assert "card.intended_use holds U+001B (a control character)" in r.output, (args, r.output)
        assert "\x1b" not in r.output and "verified)" not in r.output, (args, r.output)
    assert not (Store().models / "evil").exists()


@pytest.mark.parametrize("char", HOSTILE, ids=ascii)
@pytest.mark.parametrize("field", [("card", "intended_use"), ("card", "version"), ("model", "arch"),
                                   ("provenance", "converter_version"), ("memory", "method")])
def test_each_control_character_in_any_field_is_refused_at_read(char, field):
    section, key = field
    man = _manifest()
    man[section][key] = f"a{char}b"
    with pytest.raises(IntegrityError, match=rf"field {section}\.{key} holds U\+{ord(char):04X} ") as err:
        Manifest.from_bytes(json.dumps(man).encode(), "t")
    assert "signed or not" in err.value.problem and "pack it again" in err.value.fix


def test_keys_and_list_items_are_checked_too():
    man = _manifest({"x_\x1b[2Knote": "hi", "intended_users": ["nurses", "doctors\u202e"]})
    with pytest.raises(IntegrityError, match=r"field card\.'x_\\x1b\[2Knote' holds U\+001B"):
        Manifest.from_bytes(json.dumps(man).encode(), "t")
    del man["card"]["x_\x1b[2Knote"]
    with pytest.raises(IntegrityError, match=r"field card\.intended_users\[1\] holds U\+202E \(a bidirectional"):
        Manifest.from_bytes(json.dumps(man).encode(), "t")
    man = _manifest(memory={"profiles": {"jetson\x1b": {"n_ctx": 1, "bytes": 1, "fits": True}}})
    with pytest.raises(IntegrityError, match=r"field memory\.profiles\.'jetson\\x1b' holds"):
        Manifest.from_bytes(json.dumps(man).encode(), "t")


def test_line_breaks_and_tabs_only_in_card_prose():
    ok = _manifest({"intended_use": "Line one.\n\tLine two.", "known_limitations": ["a\nb"], "x_notes": "1\n2",
                    "performance_validity": {"note": "a\nb"}, "version": "1.0"})
    assert Manifest.from_bytes(json.dumps(ok).encode(), "t").card["intended_use"] == "Line one.\n\tLine two."
    for section, key, value in (("card", "version", "1.0\n"), ("card", "model_name", "a\tb"), ("card", "keywords", ["a\nb"]),
                                ("model", "arch", "llama\n"), ("provenance", "source_architecture", "x\ty")):
        man = _manifest()
        man[section][key] = value
        with pytest.raises(IntegrityError, match=rf"field {section}\.{key}(\[0\])? holds U\+000[9A]"):
            Manifest.from_bytes(json.dumps(man).encode(), "t")


@pytest.mark.parametrize("name", ["model/a\u202egguf.exe", "model/a\x9b.gguf", "model/a\x7f.gguf", "model/\u2066x.gguf"])
def test_file_names_refuse_the_same_characters(name):
    """Names already refused C0 controls; DEL, C1 controls and bidi overrides were let through."""
    with pytest.raises(UnsafeArchive, match="unsafe path"):
        check_relpath(name, "manifest")


def test_pack_refuses_a_card_with_control_characters_naming_the_field(tmp_path):
    src = kit.inputs(tmp_path / "src")
    base = kit.CARD
    for line, where in (('version = "1.0\\u001b[31m"', "version"), ('known_biases = "none\\u202e"', "known_biases"),
                        ('version = "1.0\\n"', "version"), ('"x_\\u001b" = "a"', "'x_\\x1b'")):
        src["card"].write_text(base + line + "\n")
        with pytest.raises(InputError, match="field " + where.replace("\\", "\\\\") + " holds U\\+") as err:
            pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), tmp_path / "o.edgemed")
        assert "card.toml" in err.value.fix and not (tmp_path / "o.edgemed").exists()
    src["card"].write_text(base + 'how_to_use = """Ask a question.\nRead the answer\twith care."""\n')
    assert load_card(src["card"])["how_to_use"] == "Ask a question.\nRead the answer\twith care."


def test_pack_refuses_control_characters_from_the_model_file(tmp_path):
    """The card is not the only text: the GGUF's edgemed.* keys become provenance."""
    src = kit.inputs(tmp_path / "src", extra_kv={"edgemed.source.architecture": "Llama\x1b]52;c;ZXZpbA==\x07"})
    with pytest.raises(InputError, match=r"field provenance\.source_architecture would hold U\+001B"):
        pack(PackInputs(model=src["model"], license=src["license"], name="tiny"), tmp_path / "o.edgemed")
    assert not (tmp_path / "o.edgemed").exists()


def test_bundles_made_today_pass_and_prose_prints_indented(tmp_path):
    src = kit.inputs(tmp_path / "src")
    src["card"].write_text(kit.CARD + 'how_to_use = """Ask.\nThen read."""\n')
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), tmp_path / "t.edgemed")
    r = _cli("inspect", tmp_path / "t.edgemed")
    assert r.exit_code == 0, r.output
    assert "             how_to_use: Ask.\n               Then read.\n" in r.output
    assert _cli("verify", tmp_path / "t.edgemed").exit_code == 0
    assert _cli("install", tmp_path / "t.edgemed").exit_code == 0


def test_a_bundle_signed_with_such_text_is_refused_too(tmp_path, monkeypatch):
    """A signature says who made a bundle, not that its text is safe to print: one an older edgemed signed (simulated
    by letting pack skip its checks) is refused, and the message says so."""
    pytest.importorskip("model_signing", reason="signing needs the fleet extra")
    from edgemed.packaging import bundle, card, signing

    priv, pub = kit.keypair(tmp_path)
    src = kit.inputs(tmp_path / "src")
    src["card"].write_text(kit.CARD + 'version = "1.0\\u001b[2K"\n')
    with monkeypatch.context() as m:  # as an older edgemed made it
        m.setattr(card, "control_in", lambda *a: None)
        m.setattr(bundle, "text_fault", lambda *a: None)
        pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), tmp_path / "s",
             as_dir=True, private_key=signing.load_private_key(priv))
    for args in (["verify", tmp_path / "s", "--key", pub], ["install", tmp_path / "s", "--key", pub], ["inspect", tmp_path / "s"]):
        r = _cli(*args)
        assert r.exit_code == 1 and "card.version holds U+001B" in r.output and "signed or not" in r.output, (args, r.output)
        assert "\x1b" not in r.output


def test_list_escapes_what_an_older_store_holds(tmp_path):
    """Defence in depth: an index written before these checks (its version or origin with ESC or a bidi override in it) is
    shown escaped."""
    kit.installed_tiny(tmp_path)
    store = Store()
    idx = json.loads(store.index_path.read_text())
    idx["tiny"]["version"] = "1\x1b[2K"
    idx["tiny"]["origin"] = "oci://r.example/x\u202eexe.gguf"
    store.index_path.write_text(json.dumps(idx))
    r = _cli("list")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\u202e" not in r.output
    assert "1\\x1b[2K" in r.output and "x\\u202eexe" in r.output


def test_the_helpers():
    assert shown("plain é ß 中文 \U0001f600") == "plain é ß 中文 \U0001f600"
    assert shown("a\x1b[2K\rb\u202ec\nd\te\x9bf\udc80") == "a\\x1b[2K\\rb\\u202ec\\nd\\te\\x9bf\\udc80"
    assert shown(3) == "3"
    assert shown_prose("one\ntwo\x1b", "  ") == "one\n  two\\x1b"
    assert control_in({"a": ["ok", {"b": "x\x85"}]}) == ("a[1].b", "\x85")
    assert control_in({"a": "x\ny"}, lambda path: path == ("a",)) is None


def test_every_error_and_log_line_the_cli_prints_is_escaped(tmp_path):
    """A refusal may quote a name it was given (a path, a registry's answer): the CLI's error printer and its log
    lines escape what a terminal would act on, and keep the message's own line breaks."""
    hostile = tmp_path / "x\x1b[2K\rsignature valid\u202e"
    result = CliRunner().invoke(cli, ["verify", str(hostile)])
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\r" not in result.output and "\u202e" not in result.output
    assert "x\\x1b[2K\\rsignature valid\\u202e" in result.output and "\nFix: " in result.output

    import logging

    from edgemed.cli import _PrintableFormatter

    line = _PrintableFormatter("%(message)s").format(logging.LogRecord(
        "edgemed", logging.WARNING, __file__, 1, "left %s alone\nsecond line", ("a\x1b]52;c;evil\x07",), None))
    assert line == "left a\\x1b]52;c;evil\\x07 alone\nsecond line"
