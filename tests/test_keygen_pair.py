"""`edgemed keygen --force` replaces a key pair whole or not at all: a write that fails after the public half
(a full disk, here a real EFBIG from a file size limit) leaves the old pair, matched, and an error naming the fix."""

from __future__ import annotations

import resource
import signal

import pytest
from click.testing import CliRunner

pytest.importorskip("cryptography")

from cryptography.hazmat.primitives import serialization  # noqa: E402

from edgemed.cli import cli  # noqa: E402

import crash_kit  # noqa: E402


def _matched(private, public) -> bool:
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    mine = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return mine.strip() == public.read_bytes().strip()


def test_a_write_failing_after_the_public_half_keeps_the_old_pair(tmp_path):
    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    assert CliRunner().invoke(cli, ["keygen", str(private)]).exit_code == 0
    old = (private.read_bytes(), public.read_bytes())
    assert len(old[1]) < 200 < len(old[0])  # so a 200-byte file size limit fails the private half only

    def keygen_with_a_small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, limit[1]))
        r = CliRunner().invoke(cli, ["keygen", str(private), "--force"])
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)  # so what follows can report
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "Cannot write the key pair" in r.output and "Fix: free space" in r.output, r.output

    assert crash_kit.killed_at(keygen_with_a_small_disk, 0) == 0
    assert (private.read_bytes(), public.read_bytes()) == old and _matched(private, public)
    assert (private.stat().st_mode & 0o777) == 0o600
    assert crash_kit.debris(tmp_path) == []


def test_force_replaces_both_halves_and_without_it_neither(tmp_path):
    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    public.write_text("the user's public key\n")
    r = CliRunner().invoke(cli, ["keygen", str(private)])
    assert r.exit_code == 1 and "--force" in r.output and not private.exists()
    assert public.read_text() == "the user's public key\n"
    r = CliRunner().invoke(cli, ["keygen", str(private), "--force"])
    assert r.exit_code == 0, r.output
    assert _matched(private, public) and (private.stat().st_mode & 0o777) == 0o600
    assert crash_kit.debris(tmp_path) == []


def test_a_keygen_force_killed_at_any_step_leaves_a_pair_or_a_refusal_that_names_the_repair(tmp_path):
    """Killed between its two renames, keygen --force leaves the old private key beside the new public one. Signing
    with it is refused (bundles would not verify against the file clinics have) until `keygen --public-only`
    writes its public half again; every other step leaves the old pair or the new one, matched."""
    import bundle_kit

    from edgemed.files import debris

    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    assert CliRunner().invoke(cli, ["keygen", str(private)]).exit_code == 0
    src = bundle_kit.inputs(tmp_path / "src")
    pack = ["pack", str(src["model"]), "--license", str(src["license"]), "--name", "tiny", "--sign", str(private)]

    def run():
        CliRunner().invoke(cli, ["keygen", str(private), "--force"], catch_exceptions=False)

    names = crash_kit.steps(run, tmp_path / "src")
    mismatched = 0
    for n in range(1, len(names) + 1):
        debris.sweep(tmp_path)  # the last kill's debris, here: so the run's own steps are the ones counted
        assert crash_kit.killed_at(run, n) == crash_kit.KILLED
        old_private = private.read_bytes()
        if _matched(private, public):
            continue
        mismatched += 1
        r = CliRunner().invoke(cli, [*pack, "-o", str(tmp_path / f"b{n}.edgemed")])
        assert r.exit_code == 1 and "is not its public half" in r.output, r.output
        assert f"edgemed keygen {private} --public-only --force" in r.output and not (tmp_path / f"b{n}.edgemed").exists()
        r = CliRunner().invoke(cli, ["keygen", str(private), "--public-only", "--force"])
        assert r.exit_code == 0 and _matched(private, public) and private.read_bytes() == old_private, r.output
        assert CliRunner().invoke(cli, [*pack, "-o", str(tmp_path / f"b{n}.edgemed")]).exit_code == 0
    assert mismatched == 1  # exactly the step between the two renames
    assert CliRunner().invoke(cli, ["keygen", str(private), "--public-only"]).exit_code == 1  # it exists: --force
