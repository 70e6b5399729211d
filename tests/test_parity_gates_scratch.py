"""``benchmarks/parity_gates``' broken copies live in a folder of the run's own inside ``--work`` (which may be the
user's): removed whole afterwards, with nothing else in ``--work`` overwritten or deleted. No model needed."""

from __future__ import annotations

import pytest

from edgemed.benchmarks.parity_gates import _scratch


def test_broken_copies_go_in_a_folder_of_their_own_that_leaves_the_users_files(tmp_path):
    users = tmp_path / "smollm2-135m-instruct-q4_k_m-layer.gguf"  # the name a broken copy used to take in --work
    users.write_bytes(b"the user's own file")
    with _scratch(tmp_path) as scratch:
        assert scratch.parent == tmp_path and scratch.is_dir() and not any(scratch.iterdir())
        (scratch / "layer.gguf").write_bytes(b"broken copy")
    assert not scratch.exists()
    assert users.read_bytes() == b"the user's own file" and list(tmp_path.iterdir()) == [users]


def test_the_scratch_folder_goes_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError), _scratch(tmp_path) as scratch:
        (scratch / "special.gguf").write_bytes(b"broken copy")
        raise RuntimeError("a check failed")
    assert list(tmp_path.iterdir()) == []
