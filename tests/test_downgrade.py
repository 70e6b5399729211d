"""An older release does not replace a newer one without the operator asking (``--allow-downgrade``).

The trust policy checks who signed an update, not which release is newer. docs/fleet.md tells every device to run
a nightly ``edgemed pull oci://.../cardio-assist:stable --force``: with the tag moved back to the 1.0 bundle (a
mistaken retag, or someone with push rights replaying an old signed release with a known flaw), every device
replaced 1.1 with 1.0, exit 0, "installed ...; signature valid". ``install --force`` of an old .edgemed file did the
same. Now both compare the signed releases first: the card's version (PEP 440), else the manifest's creation time;
when neither orders them, the install goes on and says what was compared.

Through the real CNCF registry (Debian's ``docker-registry``) for the pull; the store and the comparison without it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import bundle_kit
import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.errors import StoreError
from edgemed.packaging import release_order
from edgemed.packaging.release_order import CREATED, VERSION, compare

JAN, FEB = 1735689600, 1738368000  # 2025-01-01, 2025-02-01 (UTC): the bundles' creation times


def _cli(*args, ok: bool = True) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert (r.exit_code == 0) == ok, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r.output


def _pack(tmp: Path, monkeypatch, label: str, version: str | None, epoch: int, key: Path | None = None, *,
          as_dir: bool = False, unquoted: bool = False) -> Path:
    """Bundle ``label`` of the model "cardio" (one tiny GGUF for all): its card's version and creation time.
    ``unquoted``: the card says ``version = 1.10``, a TOML number (pack refuses it: see ``_pack_as_before``)."""
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack

    src = tmp / "src"
    if not src.is_dir():
        bundle_kit.inputs(src)
    card = tmp / f"card-{label}.toml"
    line = f"version = {version}\n" if unquoted else f'version = "{version}"\n'
    card.write_text(bundle_kit.CARD + (line if version is not None else ""))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(epoch))
    out = tmp / (label if as_dir else f"{label}.edgemed")
    pack(PackInputs(model=src / "tiny.gguf", license=src / "LICENSE", card=card, name="cardio"), out, as_dir=as_dir,
         private_key=signing.load_private_key(key) if key else None)
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    return out


def _installed(home: Path) -> tuple[str | None, str]:
    """(version, manifest sha256) of the installed "cardio", from the store's index (in ``home``)."""
    rec = json.loads((home / "store" / "index.json").read_text())["cardio"]
    return rec["version"], rec["manifest_sha256"]


# -- the rule ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("installed, new, older, by", [
    (("1.1", None), ("1.0", None), True, VERSION),
    (("1.0", None), ("1.1", None), False, VERSION),
    (("1.9", "2025-02-01T00:00:00Z"), ("1.10", "2025-01-01T00:00:00Z"), False, VERSION),  # 1.10 > 1.9: not text order
    (("2.0", "2025-01-01T00:00:00Z"), ("2.0rc1", "2025-02-01T00:00:00Z"), True, VERSION),  # a pre-release is older
    (("1.0", "2025-02-01T00:00:00Z"), ("1.0", "2025-01-01T00:00:00Z"), True, CREATED),    # the same version: by time
    (("clinic-a", "2025-02-01T00:00:00Z"), ("clinic-b", "2025-01-01T00:00:00Z"), True, CREATED),  # not PEP 440
    ((None, "2025-01-01T00:00:00Z"), (None, "2025-02-01T00:00:00Z"), False, CREATED),
    (("1.1", "2025-02-01T00:00:00Z"), (None, "2025-01-01T00:00:00Z"), True, CREATED),     # a version on one side only
])
def test_the_card_version_orders_first_then_the_creation_time(installed, new, older, by):
    order = compare(*installed, *new)
    assert (order.older, order.by) == (older, by)


@pytest.mark.parametrize("installed, new, why", [
    (("clinic-a", None), ("clinic-b", None), "versions that are not both PEP 440 and no creation times"),
    (("1.0", "2025-01-01T00:00:00Z"), ("1.0", "2025-01-01T00:00:00Z"), "the same version and the same creation time"),
    ((None, "2025-01-01T00:00:00Z"), (None, "not a time"), "no versions and a creation time on one side only"),
])
def test_nothing_is_guessed_where_neither_orders_them(installed, new, why):
    order = compare(*installed, *new)
    assert order.older is None and order.by == why
    note = order.note("cardio")
    assert note.startswith("could not tell whether") and why in note and "installed it as an update" in note


def test_packaging_is_a_dependency_of_every_install():
    """Card versions are ordered as PEP 440 versions on a device install too (`edgemed[gguf,fleet]`): the library
    that reads them is one of edgemed's own dependencies, not something another package happens to bring."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "packaging" for d in deps), deps


# -- install --force of a bundle file ------------------------------------------------------------------------------

def test_install_force_of_an_older_release_is_refused_and_allow_downgrade_installs_it(tmp_path, edgemed_home, monkeypatch):
    new = _pack(tmp_path, monkeypatch, "new", "1.1", JAN)  # packed first: the version decides, not the time
    old = _pack(tmp_path, monkeypatch, "old", "1.0", FEB)
    _cli("install", new)
    installed = _installed(edgemed_home)
    out = _cli("install", old, "--force", ok=False)
    assert "'cardio' is installed at version 1.1" in out and "is version 1.0" in out and "older release by its version" in out
    assert "--allow-downgrade" in out and "edgemed rollback cardio" in out
    assert _installed(edgemed_home) == installed
    out = _cli("install", old, "--force", "--allow-downgrade")
    assert "downgraded cardio from version 1.1" in out and "to version 1.0" in out and "installed cardio" in out
    assert _installed(edgemed_home)[0] == "1.0"
    out = _cli("install", new, "--force")  # an update again: nothing to say of the order
    assert "downgraded" not in out and "could not tell" not in out and _installed(edgemed_home) == installed
    assert "could not tell" not in _cli("install", new, "--force")  # the very bundle installed: no note


def test_bundles_without_versions_are_ordered_by_creation_time_and_unordered_ones_install_with_a_note(
        tmp_path, edgemed_home, monkeypatch):
    from edgemed.packaging.store import Store

    later = _pack(tmp_path, monkeypatch, "later", None, FEB, as_dir=True)
    earlier = _pack(tmp_path, monkeypatch, "earlier", None, JAN, as_dir=True)
    store = Store()
    store.install(later)
    with pytest.raises(StoreError) as exc:
        store.install(earlier, force=True)
    assert "created 2025-02-01T00:00:00Z" in str(exc.value) and "created 2025-01-01T00:00:00Z" in str(exc.value)
    assert "older release by its creation time" in str(exc.value)
    orders = []
    store.install(earlier, force=True, allow_downgrade=True, on_order=orders.append)
    assert [(o.older, o.by) for o in orders] == [(True, CREATED)]
    odd = _pack(tmp_path, monkeypatch, "odd", "clinic build", JAN, as_dir=True)  # same time, a version on one side
    store.install(odd, force=True, on_order=orders.append)
    assert orders[-1].older is None and "a version on one side only and the same creation time" in orders[-1].by


# -- a card version written as a TOML number ---------------------------------------------------------------------

def test_pack_refuses_a_card_version_that_is_a_toml_number_naming_the_quoted_form(tmp_path, monkeypatch):
    """``version = 1.10`` unquoted is the TOML number 1.1: 1.9 -> 1.10 was ordered as a downgrade and refused on every
    device's nightly pull --force. pack refuses the card, naming the field and the form that keeps what was written."""
    from edgemed.errors import InputError

    for written in ("1.10", "2025.10", "3"):
        with pytest.raises(InputError) as exc:
            _pack(tmp_path, monkeypatch, "n" + written, written, JAN, unquoted=True)
        assert "gives version as a number" in str(exc.value) and f'version = "{written}"' in exc.value.fix, str(exc.value)
    src = tmp_path / "src"
    card = tmp_path / "card-n1.10.toml"
    out = _cli("pack", src / "tiny.gguf", "--license", src / "LICENSE", "--card", card, "-o", tmp_path / "x.edgemed", ok=False)
    assert "version" in out and 'version = "1.10"' in out and not (tmp_path / "x.edgemed").exists(), out
    _pack(tmp_path, monkeypatch, "quoted", "1.10", JAN)  # the same release, as text: packed


def _pack_as_before(tmp: Path, monkeypatch, label: str, written: str, epoch: int) -> Path:
    """A bundle whose card holds ``version = WRITTEN`` as a TOML number, as pack made one before it refused that."""
    from edgemed.packaging import card

    with monkeypatch.context() as m:
        m.setattr(card, "_check_version", lambda *args: None)
        return _pack(tmp, monkeypatch, label, written, epoch, as_dir=True, unquoted=True)


def test_card_versions_that_are_numbers_order_nothing_so_the_creation_time_decides(tmp_path, edgemed_home, monkeypatch):
    """Bundles packed before pack refused a number: 1.9 installed, then 1.10 (the float 1.1), created later. Ordered as
    the text "1.1" it was a downgrade, refused with advice to pass --allow-downgrade; a number is no PEP 440 version,
    so the creation time orders them. ``list`` still shows the installed version as it did."""
    from edgemed.packaging.manifest import Manifest
    from edgemed.packaging.store import Store

    v19 = _pack_as_before(tmp_path, monkeypatch, "v19", "1.9", JAN)
    v110 = _pack_as_before(tmp_path, monkeypatch, "v110", "1.10", FEB)
    mans = {b: Manifest.from_bytes((b / "manifest.json").read_bytes(), str(b)) for b in (v19, v110)}
    assert (mans[v19].card["version"], mans[v110].card["version"]) == (1.9, 1.1)
    store = Store()
    store.install(v19)
    assert _installed(edgemed_home)[0] == "1.9" and json.loads(_cli("list", "--json"))[0]["version"] == "1.9"
    order = release_order.check(store, "cardio", mans[v110], (v110 / "manifest.json").read_bytes(), None)
    assert (order.older, order.by) == (False, CREATED), order
    assert (order.installed, order.new) == ("version 1.9 (created 2025-01-01T00:00:00Z)",
                                            "version 1.1 (created 2025-02-01T00:00:00Z)")
    orders = []
    store.install(v110, force=True, on_order=orders.append)  # the update goes in, with nothing to say
    assert [(o.older, o.by) for o in orders] == [(False, CREATED)] and orders[0].note("cardio") is None
    with pytest.raises(StoreError, match="older release by its creation time"):  # and back is refused, by the time
        store.install(v19, force=True)
    # the installed side is its signed card's number, not the index's text "1.1": a "1.2" made before 1.10 is older
    v12 = _pack(tmp_path, monkeypatch, "v12", "1.2", JAN, as_dir=True)
    with pytest.raises(StoreError, match="is version 1.2 .*older release by its creation time"):
        store.install(v12, force=True)
    assert compare(1.9, None, 1.1, None).older is None  # numbers alone order nothing
    assert compare("1.9", None, 1.1, "2025-02-01T00:00:00Z").by == "versions that are not both PEP 440 and a creation time on one side only"


def test_the_installed_creation_time_is_read_only_from_the_manifest_the_index_records(tmp_path, edgemed_home, monkeypatch):
    from edgemed.packaging.store import Store

    later = _pack(tmp_path, monkeypatch, "later", None, FEB, as_dir=True)
    store = Store()
    store.install(later)
    rec = store.record("cardio")
    assert release_order.installed_manifest(store, "cardio", rec).created == "2025-02-01T00:00:00Z"
    assert release_order.installed_manifest(store, "cardio", {**rec, "manifest_sha256": "0" * 64}) is None


# -- pull --force of a tag moved back, through the registry ---------------------------------------------------------

def test_a_tag_moved_back_to_an_older_signed_release_is_refused_by_the_nightly_pull(registry, tmp_path, edgemed_home, monkeypatch):
    key, pub = bundle_kit.keypair(tmp_path)
    v11 = _pack(tmp_path, monkeypatch, "v11", "1.1", FEB, key, as_dir=True)
    v10 = _pack(tmp_path, monkeypatch, "v10", "1.0", JAN, key, as_dir=True)
    edgemed_home.mkdir(parents=True, exist_ok=True)
    (edgemed_home / "trust.toml").write_text(f'[registries."{registry.host}"]\nkeys = ["{pub}"]\n')
    stable = registry.ref("clinic/cardio:stable")
    _cli("push", v11, stable)
    _cli("pull", stable, "--force")
    installed = _installed(edgemed_home)
    assert installed[0] == "1.1"
    assert json.loads(_cli("pull", stable, "--force", "--json"))["already_installed"]  # the same digest: a no-op

    _cli("push", v10, stable)  # the tag moved back
    seen = len(registry.access())
    out = _cli("pull", stable, "--force", ok=False)
    assert "'cardio' is installed at version 1.1" in out and "is version 1.0" in out, out
    assert "--allow-downgrade" in out and "edgemed rollback cardio" in out
    assert _installed(edgemed_home) == installed and json.loads(_cli("list", "--json"))[0]["version"] == "1.1"
    meta = sorted(f"sha256:{hashlib.sha256((v10 / f).read_bytes()).hexdigest()}" for f in ("manifest.json", "model.sig"))
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in registry.access()[seen:] if "/blobs/" in r["path"]) == meta, \
        "refused on the manifest and signature alone (card.toml, which differs, was not fetched)"

    out = json.loads(_cli("pull", stable, "--force", "--allow-downgrade", "--json"))
    assert out["release"]["older"] is True and out["release"]["by"] == VERSION
    assert _installed(edgemed_home)[0] == "1.0"
    _cli("rollback", "cardio")  # and back to 1.1, the copy the store kept
    assert _installed(edgemed_home) == installed
    out = _cli("pull", stable, "--force", "--allow-downgrade")
    assert "downgraded cardio from version 1.1" in out and "to version 1.0" in out and "installed cardio" in out

    # the tag forward again: an update; a device rolled back from it goes forward at the next nightly pull
    _cli("push", v11, stable)
    for step in ("pull", "rollback", "pull"):
        out = _cli("pull", stable, "--force") if step == "pull" else _cli("rollback", "cardio")
        assert "downgraded" not in out and "could not tell" not in out
        assert _installed(edgemed_home)[0] == ("1.1" if step == "pull" else "1.0")
