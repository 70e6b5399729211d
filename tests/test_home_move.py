"""Where edgemed keeps its state: the user's data folder, not ~/.cache (which cache cleaners empty, trust policy and
all); a state folder an earlier version left in ~/.cache/edgemed is used until `edgemed home --move` moves it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed import env
from edgemed.cli import cli
from edgemed.errors import InputError
from edgemed.packaging import home_move
from edgemed.packaging import trust

import bundle_kit  # noqa: E402
import crash_kit  # noqa: E402
from crash_kit import KILLED

POLICY = '[local]\nrequire_signature = true\nkeys = ["keys/vendor.pub.pem"]\n'


def _public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


PEM = _public_pem()


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user's home folder, with no EDGEMED_HOME, EDGEMED_CACHE_DIR or XDG folders set."""
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (env.HOME_VAR, env.CACHE_VAR, "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    env._told.clear()
    return home


def _old_state(user: Path) -> Path:
    """A state folder as earlier versions left it: store, trust policy, keys, an audit log, and a cache."""
    old = user / ".cache" / "edgemed"
    (old / "store" / "models" / "cardio").mkdir(parents=True)
    (old / "store" / "models" / "cardio" / "model.gguf").write_bytes(b"GGUF weights")
    (old / "store" / "lock").touch()
    (old / "keys").mkdir()
    (old / "keys" / "vendor.pub.pem").write_bytes(PEM)
    (old / "trust.toml").write_text(POLICY)
    (old / "audit").mkdir()
    (old / "audit" / "cardio.jsonl").touch(mode=0o600)
    (old / "cache" / "gguf").mkdir(parents=True)
    (old / "cache" / "gguf" / "qwen.gguf").write_bytes(b"cached")
    return old


def test_the_default_state_folder_is_the_users_data_folder_and_the_cache_stays_where_it_was(user, monkeypatch):
    assert env.home() == user / ".local" / "share" / "edgemed"
    assert env.cache_root() == user / ".cache" / "edgemed" / "cache"  # caches made before are found again
    assert env.cache_dir("gguf") == user / ".cache" / "edgemed" / "cache" / "gguf"
    monkeypatch.setenv("XDG_DATA_HOME", str(user / "data"))
    assert env.home() == user / "data" / "edgemed"
    monkeypatch.setenv(env.HOME_VAR, str(user / "mine"))  # as before: state and cache under it
    assert env.home() == user / "mine" and env.cache_root() == user / "mine" / "cache"


def test_a_state_folder_left_in_the_cache_is_used_with_a_warning_until_moved(user, caplog):
    (user / ".cache" / "edgemed" / "cache").mkdir(parents=True)  # a cache alone is no state
    assert env.home() == user / ".local" / "share" / "edgemed"
    (user / ".cache" / "edgemed" / "cache").rmdir()
    old = _old_state(user)
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        assert env.home() == old  # switching would drop its trust policy, and with it the signature checks
        assert env.home() == old
    warned = [r.getMessage() for r in caplog.records if "cache cleaners" in r.getMessage()]
    assert len(warned) == 1 and "edgemed home --move" in warned[0]  # once per process
    assert trust.load().exists and trust.load().local.require_signature


def test_move_keeps_every_file_and_puts_the_cache_back(user):
    old = _old_state(user)
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    moved = home_move.move()
    new = user / ".local" / "share" / "edgemed"
    assert moved.state == new and moved.state_moved and moved.cache == old / "cache" and moved.left is None
    assert env.home() == new and env.stranded_home() is None
    after = {p.relative_to(new): p.read_bytes() for p in new.rglob("*") if p.is_file()}
    after |= {Path("cache") / p.relative_to(old / "cache"): p.read_bytes() for p in (old / "cache").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in old.iterdir()) == ["cache"]  # the old folder holds only the cache now
    assert trust.load().path == new / "trust.toml" and trust.load().local.require_signature
    assert home_move.move() is None  # nothing left to move


def test_move_refuses_while_a_command_holds_a_lock_and_leaves_everything(user):
    from edgemed.serve.audit import AuditLog

    old = _old_state(user)
    log = AuditLog(old / "audit" / "cardio.jsonl")  # a running `edgemed serve`
    with pytest.raises(InputError, match="cardio.jsonl is locked"):
        home_move.move()
    log.close()
    fd = os.open(old / "store" / "lock", os.O_RDONLY)  # an install in progress
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(InputError, match="lock is locked") as err:
            home_move.move()
        assert "stop `edgemed serve`" in err.value.fix
    finally:
        os.close(fd)
    assert (old / "trust.toml").read_text() == POLICY and not (user / ".local" / "share" / "edgemed").exists()
    assert home_move.move().state_moved  # once they are done


def test_move_refuses_two_state_folders_and_a_set_edgemed_home(user, monkeypatch):
    old = _old_state(user)
    new = user / ".local" / "share" / "edgemed"
    (new / "store").mkdir(parents=True)
    with pytest.raises(InputError, match="will not merge"):
        home_move.move()
    assert (old / "trust.toml").is_file() and sorted(p.name for p in new.iterdir()) == ["store"]
    monkeypatch.setenv(env.HOME_VAR, str(old))
    with pytest.raises(InputError, match="nothing to move") as err:
        home_move.move()
    assert f"unset {env.HOME_VAR}" in err.value.fix


def test_a_trust_policy_left_behind_is_not_silently_dropped(user, caplog):
    """A newer state folder without trust.toml, the policy still in the old one (an older edgemed, or the old
    instructions, put it there): signature checks would stop without a word, so loading the policy refuses."""
    old = _old_state(user)
    new = user / ".local" / "share" / "edgemed"
    (new / "store").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="edgemed"):
        assert env.home() == new and env.stranded_home() == old
    assert any("no longer read" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="older edgemed state folder") as err:
        trust.load()
    assert str(old / "trust.toml") in err.value.problem and str(new) in err.value.fix
    from edgemed.packaging.bundle import PackInputs, pack

    src = bundle_kit.inputs(user / "src")  # an unsigned bundle, which the left-behind policy would refuse
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), user / "tiny.edgemed")
    result = CliRunner().invoke(cli, ["install", str(user / "tiny.edgemed")])
    assert result.exit_code == 1 and "older edgemed state folder" in result.output
    assert not (new / "store" / "models").exists()
    (new / "trust.toml").write_text("[local]\nrequire_signature = false\n")  # the operator chose the new one
    assert not trust.load().local.require_signature


@pytest.mark.parametrize("taken", [False, True])
def test_move_killed_at_every_step_leaves_the_state_whole_in_one_folder(user, tmp_path, taken):
    """A kill at any instant: the state (trust policy, keys, store) is whole in the old folder or the new one, and
    `edgemed home` resolves to that one; a second --move finishes what the first began."""
    old, new = user / ".cache" / "edgemed", user / ".local" / "share" / "edgemed"
    cache = user / "cache-root" if taken else None

    def prepare():
        for folder in (user / ".cache", user / ".local", user / "cache-root"):
            shutil.rmtree(folder, ignore_errors=True)
        _old_state(user)
        if taken:  # the cache's new place is already taken: the old cache stays, unused, and is not deleted
            (user / "cache-root").mkdir()

    steps = crash_kit.steps(lambda: (prepare(), home_move.move(cache=cache)), tmp_path)
    assert steps == ["1 rename the state folder"] + ([] if taken else ["2 rename the cache back"])
    for n in range(1, len(steps) + 1):
        prepare()
        assert crash_kit.killed_at(lambda: home_move.move(cache=cache), n) == KILLED
        state = env.home()
        assert state in (old, new) and (state / "trust.toml").read_text() == POLICY
        assert (state / "keys" / "vendor.pub.pem").read_bytes() == PEM
        assert (state / "store" / "models" / "cardio" / "model.gguf").read_bytes() == b"GGUF weights"
        again = home_move.move(cache=cache)
        assert env.home() == new and (new / "trust.toml").read_text() == POLICY
        if taken:
            assert again.left == new / "cache" and (new / "cache" / "gguf" / "qwen.gguf").read_bytes() == b"cached"
        else:
            assert (old / "cache" / "gguf" / "qwen.gguf").read_bytes() == b"cached"
            assert not (new / "cache").exists()


def test_cli_home_shows_and_moves(user):
    old = _old_state(user)
    runner = CliRunner()
    shown = runner.invoke(cli, ["home", "--json"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.stdout)
    assert facts["state"] == str(old) and "edgemed home --move" in facts["state_from"] and facts["trust_policy_present"]
    moved = runner.invoke(cli, ["home", "--move"])
    assert moved.exit_code == 0, moved.output
    new = user / ".local" / "share" / "edgemed"
    assert f"moved edgemed's state to {new}, its cache to {old / 'cache'}" in moved.output
    assert f"state:        {new} (default)" in moved.output
    again = runner.invoke(cli, ["home", "--move"])
    assert "nothing to move" in again.output


def test_a_policy_written_into_the_new_folder_first_joins_the_move(user):
    """The trust-policy steps run on a device an earlier version set up, before the move: the new folder holds
    only trust.toml and keys/. The move brings them into the state and moves all of it; nothing is split."""
    new = _policy_first(user)
    assert home_move.move().state_moved
    assert (new / "store" / "models" / "cardio" / "model.gguf").read_bytes() == b"GGUF weights"
    assert trust.load().path == new / "trust.toml" and trust.load().local.require_signature
    assert env.stranded_home() is None


def _policy_first(user: Path) -> Path:
    """The layout a device an earlier version set up has when the trust-policy steps ran before the move: the old
    folder holds the store, the new one only trust.toml and keys/."""
    old = _old_state(user)
    (old / "trust.toml").unlink()
    shutil.rmtree(old / "keys")
    new = user / ".local" / "share" / "edgemed"
    (new / "keys").mkdir(parents=True)
    (new / "keys" / "vendor.pub.pem").write_bytes(PEM)
    (new / "trust.toml").write_text(POLICY)
    return new


def test_a_move_killed_between_the_keys_and_the_policy_says_to_run_it_again(user):
    """Killed after it brought keys/ into the old folder and before trust.toml: the policy (in the new folder, which
    is used) names a key that is in the old one. Every command is refused, saying the move was interrupted, not to
    put the signer's key there; the move run again joins them."""
    new = _policy_first(user)
    assert crash_kit.killed_at(home_move.move, 2) == KILLED
    assert env.home() == new and not (new / "keys").exists()
    with pytest.raises(InputError, match="vendor.pub.pem.*which does not exist") as err:
        trust.load()
    assert "interrupted `edgemed home --move`" in err.value.fix and "run `edgemed home --move` again" in err.value.fix
    assert ".pub.pem (or the root certificate) there" not in err.value.fix
    home_move.move()
    assert trust.load().local.require_signature and (new / "keys" / "vendor.pub.pem").read_bytes() == PEM


def test_a_policy_first_move_killed_at_every_step_is_whole_or_says_to_run_it_again(user, tmp_path):
    """The policy-first layout, killed at each step: the policy loads in the folder in use, or its refusal names
    the interrupted move; a second --move leaves all of it whole in the new folder."""
    def prepare():
        for folder in (user / ".cache", user / ".local"):
            shutil.rmtree(folder, ignore_errors=True)
        _policy_first(user)

    steps = crash_kit.steps(lambda: (prepare(), home_move.move()), tmp_path)
    assert steps[:2] == ["1 bring keys into the state folder", "2 bring trust.toml into the state folder"]
    new = user / ".local" / "share" / "edgemed"
    for n in range(1, len(steps) + 1):
        prepare()
        env._told.clear()
        assert crash_kit.killed_at(home_move.move, n) == KILLED
        try:
            assert trust.load().local.require_signature
        except InputError as exc:
            assert "interrupted `edgemed home --move`" in exc.fix, (n, exc.fix)
        home_move.move()
        assert env.home() == new and trust.load().local.require_signature
        assert (new / "store" / "models" / "cardio" / "model.gguf").read_bytes() == b"GGUF weights"


def test_a_policy_naming_keys_by_full_path_inside_the_old_folder_is_not_moved_broken(user):
    old = _old_state(user)
    (old / "trust.toml").write_text(f'[local]\nkeys = ["{old / "keys" / "vendor.pub.pem"}"]\n')
    with pytest.raises(InputError, match="by its full path") as err:
        home_move.move()
    assert "keys/vendor.pub.pem" in err.value.fix and (old / "trust.toml").is_file()
    assert not (user / ".local" / "share" / "edgemed").exists()


def test_a_command_that_began_before_the_move_writes_nothing_where_the_state_was(user, tmp_path):
    """An install or pull that resolved the store before `home --move` (it takes the store's lock only later) is
    refused, and a verify's cache of digests is not saved there: the old folder holds no state again."""
    from edgemed.packaging.bundle import PackInputs, pack
    from edgemed.packaging.digest import VerifiedCache
    from edgemed.packaging.store import Store

    old = _old_state(user)
    src = bundle_kit.inputs(tmp_path / "src")
    bundle = tmp_path / "tiny.edgemed"
    pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="tiny"), bundle)
    (old / "trust.toml").write_text("[local]\nrequire_signature = false\n")
    store, cache = Store(), VerifiedCache()
    home_move.move()
    with pytest.raises(InputError, match="state moved"):
        store.install(bundle)
    cache.entries["x"], cache.dirty = {"stamp": [], "sha256": "0" * 64}, True
    cache.save()
    assert sorted(p.name for p in old.iterdir()) == ["cache"] and env.stranded_home() is None
    Store().install(bundle)  # run again: it lands in the moved store
    assert "tiny" in [m["name"] for m in Store().list()]


def test_cli_home_names_a_policy_it_cannot_read_and_prints_its_path(user):
    new = user / ".local" / "share" / "edgemed"
    new.mkdir(parents=True)
    (new / "trust.toml").symlink_to(user / "gone.toml")
    shown = CliRunner().invoke(cli, ["home"])
    assert "absent" not in shown.output and "refused" in shown.output, shown.output
    assert CliRunner().invoke(cli, ["home", "--path"]).output == f"{new}\n"
