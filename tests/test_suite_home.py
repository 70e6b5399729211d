"""The suite's own sandbox (conftest): what runs before a test's EDGEMED_HOME is set, a session or module fixture,
works in the run's home and the test cache, never in the user's; and the check that fails a run which wrote there."""

from __future__ import annotations

import pytest
from conftest import TEST_CACHE, USER_STATE, changed_state, state_of

from edgemed import env


@pytest.fixture(scope="module")
def seen_by_a_module_fixture():
    return env.home(), env.cache_root()


def test_a_module_fixture_works_in_the_runs_home_and_the_test_cache(seen_by_a_module_fixture, tmp_path_factory):
    home, cache = seen_by_a_module_fixture
    assert home.is_relative_to(tmp_path_factory.getbasetemp()), home
    assert home not in USER_STATE and env.default_home() in USER_STATE and env.legacy_home() in USER_STATE
    assert cache == TEST_CACHE


def test_a_change_in_a_state_folder_is_seen_and_one_in_its_cache_is_not(tmp_path):
    folder = tmp_path / "state"
    (folder / env.CACHE_ENTRY).mkdir(parents=True)
    (folder / "made-dirs.json").write_text("{}\n")
    (folder / "trust.toml").write_text("")
    before = {folder: state_of(folder)}
    assert set(before[folder]) == {"made-dirs.json", "trust.toml"}

    (folder / env.CACHE_ENTRY / "checkpoints").mkdir()
    assert changed_state(before) == {}
    (folder / "made-dirs.json").write_text('{"1:2": {}}\n')
    (folder / "trust.toml").unlink()
    (folder / "store").mkdir()
    (folder / "store" / "index.json").write_text("{}")
    assert changed_state(before) == {folder: ["made-dirs.json", "store", "store/index.json", "trust.toml"]}
