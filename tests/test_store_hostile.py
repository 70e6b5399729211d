"""The model store survives hostile or damaged on-disk state: a malformed index.json, an edited or cut
journal after a killed install, and foreign folders in store/tmp. Every case answers with an edgemed
error or a warning (never a traceback), and no installed model is moved or deleted on the word of a
file edgemed cannot check."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from click.testing import CliRunner

from edgemed.files import atomic
from edgemed.cli import cli
from edgemed.errors import EdgemedError
from edgemed.packaging.store import Store

import bundle_kit  # noqa: E402
import crash_kit  # noqa: E402
from crash_kit import KILLED


@pytest.fixture
def bundles(tmp_path):
    """Two bundles of one model name, different content: 'old' and 'new' (paths, manifest sha256)."""
    return {label: (path, _sha(man)) for label, (path, man) in bundle_kit.two_versions(tmp_path).items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cli(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    # an expected failure is a click exit (code 1, "Error: ..."); anything else escaped as a traceback
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.output, r.exc_info)
    return r


def _verified_sha(name: str = "tiny") -> str:
    r = _cli("verify", name, "--full", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["manifest_sha256"]


# -- 1. index.json that is not a JSON object of records ---------------------------------------

@pytest.mark.parametrize("text", ["[]", '["tiny"]', '{"name": "x"}', '{"tiny": "x"}', '{"tiny": {"manifest_sha256": 5}}',
                                  "[" * 30000 + "]" * 30000])
def test_damaged_index_is_an_edgemed_error_and_list_shows_what_it_can(bundles, text):
    s = Store()
    s.install(bundles["old"][0])
    s.index_path.write_text(text)
    r = _cli("list")
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("tiny "))
    assert "DAMAGED" in row and "index.json" in row, r.output  # the model is shown, and what is wrong with it
    rows = {x["name"]: x for x in s.list()}
    assert set(rows) >= {"tiny"} and "error" in rows["tiny"]
    for cmd in (["verify", "tiny"], ["run", "tiny", "--prompt", "hi"]):
        r = _cli(*cmd)
        assert r.exit_code == 1 and "index.json" in r.output and "Fix:" in r.output, (cmd, r.output)
    assert s.index_path.read_text() == text  # never rewritten on a reader's guess


@pytest.mark.parametrize("text", ["[]", "\"x\"", "[" * 30000 + "]" * 30000])
def test_writers_refuse_a_damaged_index_before_touching_models(bundles, text):
    s = Store()
    s.install(bundles["old"][0])
    s.index_path.write_text(text)
    r = _cli("install", bundles["new"][0], "--force")
    assert r.exit_code == 1 and "index.json" in r.output and "mv " in r.output, r.output
    assert s.index_path.read_text() == text
    assert _sha((s.models / "tiny" / "manifest.json").read_bytes()) == bundles["old"][1]
    assert not s.journal_path.exists() and list(s.tmp.iterdir()) == []
    # the fix the message names works: move the index away, reinstall
    s.index_path.rename(s.index_path.with_name("index.json.damaged"))
    assert _cli("install", bundles["new"][0], "--force").exit_code == 0
    assert _verified_sha() == bundles["new"][1]


def test_a_damaged_record_of_another_model_does_not_block_this_one(bundles):
    s = Store()
    s.install(bundles["old"][0])
    s.install(bundles["old"][0], name="other")
    idx = json.loads(s.index_path.read_text())
    idx["other"] = "x"
    s.index_path.write_text(json.dumps(idx))
    assert _verified_sha() == bundles["old"][1]
    rows = {x["name"]: x for x in s.list()}
    assert "error" not in rows["tiny"] and "index.json" in rows["other"]["error"] and "damaged" in rows["other"]["error"]
    r = _cli("verify", "other")
    assert r.exit_code == 1 and "index.json" in r.output and "--force" in r.output, r.output
    s.install(bundles["new"][0], force=True)  # a writer keeps the record it does not own as it was
    assert json.loads(s.index_path.read_text())["other"] == "x"


# -- 2. a journal edited or cut after a killed install --------------------------------------

def _killed_install(bundles, tmp_path, at: str = "atomic.exchange") -> dict:
    """Install 'old', then kill `install new --force` at the step ``at`` (by default just before the swap):
    return the journal it left."""
    Store().install(bundles["old"][0])
    run = lambda: Store().install(bundles["new"][0], force=True)  # noqa: E731
    names = crash_kit.steps(run, tmp_path)
    bundle_kit.installed_alone(bundles["old"][0])
    n = next(i for i, s in enumerate(names, 1) if s.split()[1] == at)
    assert crash_kit.killed_at(run, n) == KILLED
    return json.loads(Store().journal_path.read_text())


def _variants(j: dict, old_sha: str) -> dict[str, str]:
    def drop(key, **change):
        return json.dumps({k: v for k, v in {**j, **change}.items() if k != key})

    rec = j["record"]
    return {
        "deep": "[" * 30000 + "]" * 30000,
        "cut": json.dumps(j)[:40],
        "list": json.dumps([j]),
        "remove-no-trash": json.dumps({"op": "remove", "name": "tiny"}),
        "no-sha256": drop("sha256"),
        "no-record": drop("record", sha256=old_sha),
        "no-aside": drop("aside", name="ghost"),
        "no-stage": drop("stage"),
        "record-string": json.dumps({**j, "sha256": old_sha, "record": "x"}),
        "record-wrong-types": json.dumps({**j, "sha256": old_sha, "record": {**rec, "manifest_sha256": old_sha, "signed_by": 7}}),
        "name-traversal": json.dumps({**j, "name": "../models"}),
        "name-newline": json.dumps({**j, "name": "tiny\n"}),
        "stage-outside-tmp": json.dumps({**j, "stage": "../models/tiny"}),
        "remove-trash-is-stage": json.dumps({"op": "remove", "name": "tiny", "trash": j["stage"]}),
        "extra-key": json.dumps({**j, "force": True}),
        "oversized": json.dumps({**j, "pad": "x" * 100_000}),
        "op-unhashable": json.dumps({**j, "op": ["install"]}),
    }


VARIANTS = list(_variants({"record": {}, "stage": "", "aside": ""}, "0" * 64))


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_edited_journal_is_set_aside_and_no_model_changes(bundles, tmp_path, caplog, variant):
    j = _killed_install(bundles, tmp_path)
    s = Store()
    text = _variants(j, bundles["old"][1])[variant]
    s.journal_path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        r = _cli("list")  # a read-only command: it settles a dead operation's journal
    assert r.exit_code == 0 and r.stdout.startswith("tiny ") and "DAMAGED" not in r.stdout, r.output
    assert not s.journal_path.exists()
    kept = list(s.root.glob("journal.rejected-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == text  # set aside, not deleted
    assert any("set aside" in m and "journal" in m for m in caplog.messages), caplog.messages
    assert _verified_sha() == bundles["old"][1]
    assert not (s.models / "ghost").exists() and sorted(p.name for p in s.models.iterdir()) == ["tiny"]
    assert json.loads(s.index_path.read_text())["tiny"]["manifest_sha256"] == bundles["old"][1]
    with s.locked():
        pass
    assert list(s.tmp.iterdir()) == []  # the dead install's staging is swept as usual


def test_a_journal_edited_into_a_remove_never_deletes_the_installed_model(bundles, tmp_path):
    """The edit is well-formed, but nothing was staged for a remove: settling has nothing to finish."""
    j = _killed_install(bundles, tmp_path)
    s = Store()
    owner_rand = j["stage"][len(".install.edgemed-"):]
    s.journal_path.write_text(json.dumps({"op": "remove", "name": "tiny", "trash": f".rm-tiny.edgemed-{owner_rand}"}))
    r = _cli("list")
    assert r.exit_code == 0 and r.stdout.startswith("tiny "), r.output
    assert not s.journal_path.exists()
    assert _verified_sha() == bundles["old"][1]


def test_a_journal_edited_after_the_swap_keeps_index_and_models(bundles, tmp_path, monkeypatch):
    """Two renames, killed between them (the old model is aside), then the journal cut: the aside is
    restored because the index vouches for it (its manifest is the one the index records)."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    j = _killed_install(bundles, tmp_path, at="atomic.rename-in")
    s = Store()
    assert not (s.models / "tiny").exists() and (s.tmp / j["aside"]).is_dir()
    s.journal_path.write_text(json.dumps(j)[:50])
    assert _verified_sha() == bundles["old"][1]
    assert len(list(s.root.glob("journal.rejected-*.json"))) == 1
    with s.locked():
        pass
    assert list(s.tmp.iterdir()) == []


@pytest.mark.parametrize("kind", ["dangling-link", "directory"])
def test_a_journal_that_is_not_a_plain_file_is_set_aside(bundles, tmp_path, kind):
    _killed_install(bundles, tmp_path)
    s = Store()
    s.journal_path.unlink()
    if kind == "directory":
        s.journal_path.mkdir()
    else:
        s.journal_path.symlink_to(tmp_path / "nowhere")
    r = _cli("list")
    assert r.exit_code == 0 and r.stdout.startswith("tiny "), r.output
    assert not s.journal_path.is_symlink() and not s.journal_path.exists()
    assert len(list(s.root.glob("journal.rejected-*.json"))) == 1
    assert _verified_sha() == bundles["old"][1]


# -- 3. foreign folders in store/tmp ------------------------------------------------------------

def test_foreign_staging_names_in_tmp_are_left_alone(bundles):
    s = Store()
    s.install(bundles["old"][0])
    for n in ("install.evil", "rm.tiny.123", "install.x1y2z3ab"):
        (s.tmp / n).mkdir()
        (s.tmp / n / "precious").write_text("not edgemed's")
    s.install(bundles["new"][0], force=True)
    s.remove("tiny")
    for n in ("install.evil", "rm.tiny.123", "install.x1y2z3ab"):
        assert (s.tmp / n / "precious").read_text() == "not edgemed's"


def test_an_old_folder_in_tmp_never_becomes_a_ghost_model(bundles):
    s = Store()
    s.install(bundles["old"][0])
    ghost = s.tmp / "old.evil.123"
    ghost.mkdir()
    (ghost / "manifest.json").write_text("{}")
    s.install(bundles["new"][0], force=True)  # any store operation
    assert not (s.models / "evil").exists() and (ghost / "manifest.json").exists()
    r = _cli("install", bundles["old"][0], "--name", "evil")  # not blocked by a ghost
    assert r.exit_code == 0, r.output
    assert _verified_sha("evil") == bundles["old"][1]


def test_an_old_folder_is_restored_only_when_it_is_the_indexed_model(bundles):
    """An older edgemed's aside (old.NAME.PID) goes back only if its manifest is the one the index records."""
    s = Store()
    s.install(bundles["old"][0])
    (s.models / "tiny").rename(s.tmp / "old.tiny.12345")
    idx = json.loads(s.index_path.read_text())
    idx["tiny"]["manifest_sha256"] = "0" * 64  # the index names another model
    s.index_path.write_text(json.dumps(idx))
    with s.locked():
        pass
    assert not (s.models / "tiny").exists() and (s.tmp / "old.tiny.12345").is_dir()


def test_a_model_name_with_a_final_newline_is_refused():
    from edgemed.errors import InputError
    from edgemed.packaging.manifest import check_name

    with pytest.raises(InputError):
        check_name("tiny\n")


def test_errors_name_a_fix(bundles):
    s = Store()
    s.install(bundles["old"][0])
    s.index_path.write_text("[]")
    with pytest.raises(EdgemedError) as e:
        s.index()
    assert e.value.fix and str(s.index_path) in e.value.problem


def _aside_with_a_wrong_record(bundles, tmp_path) -> dict:
    """`install new --force` killed between its two renames (the old model aside, ``models/tiny`` empty), then
    the index's record for tiny made well formed but wrong (not the aside's manifest); returns the journal."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic, "_exchange", lambda a, b: False)
        j = _killed_install(bundles, tmp_path, at="atomic.rename-in")
    s = Store()
    assert not (s.models / "tiny").exists() and (s.tmp / j["aside"]).is_dir()
    idx = json.loads(s.index_path.read_text())
    idx["tiny"]["manifest_sha256"] = "f" * 64
    s.index_path.write_text(json.dumps(idx))
    return j


def test_an_interrupted_replacement_never_discards_the_aside_model(bundles, tmp_path):
    """The old model is aside and ``models/tiny`` is empty when the index's record for it is wrong (a stale or
    hand-edited sha256): settling puts the aside back rather than discarding what may be the only copy."""
    _aside_with_a_wrong_record(bundles, tmp_path)
    s = Store()
    with s.locked():
        pass
    assert (s.models / "tiny" / "manifest.json").is_file()  # back in place, not deleted
    assert _sha((s.models / "tiny" / "manifest.json").read_bytes()) == bundles["old"][1]
    assert _cli("verify", "tiny").exit_code == 1  # the mismatch is said, not hidden


def test_an_aside_whose_journal_is_gone_is_put_back_not_swept(bundles, tmp_path):
    """The same, with the journal gone too: the sweep of dead owners' staging would delete the aside, the model's
    only copy; it goes back under ``models/`` first (the index names the model), and verify says it differs."""
    j = _aside_with_a_wrong_record(bundles, tmp_path)
    s = Store()
    s.journal_path.unlink()
    with s.locked():
        pass
    assert not (s.tmp / j["aside"]).exists()
    assert _sha((s.models / "tiny" / "manifest.json").read_bytes()) == bundles["old"][1]
