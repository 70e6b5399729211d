"""The serving studies' shared machine block and ratios paired by round."""

from edgemed.benchmarks import anchors, provenance
from edgemed.runtime import native_build

KEYS = {"cpu_count", "cpu", "cpu_flags", "platform", "python", "llama_cpp_python", "anchors_compiler",
        "runtime_compilers", "edgemed_commit", "edgemed_changed", "loadavg_at_save", "note"}


def test_machine_block_names_cpu_compilers_versions_commit_and_load(monkeypatch):
    monkeypatch.setattr(anchors, "built_with", lambda: "gcc (Debian 12.2.0-14) 12.2.0")
    monkeypatch.setattr(native_build, "compilers", lambda folder=None: ("clang version 16.0.6",))
    m = provenance.machine({"commit": "0123abcd", "changed": ["edgemed/x.py"]}, extra_key=1)
    assert KEYS <= set(m) and m["extra_key"] == 1
    assert m["anchors_compiler"] == "gcc (Debian 12.2.0-14) 12.2.0" and m["runtime_compilers"] == ["clang version 16.0.6"]
    assert m["edgemed_commit"] == "0123abcd" and m["edgemed_changed"] == ["edgemed/x.py"]
    assert len(m["loadavg_at_save"]) == 3 and m["cpu_count"] >= 1
    assert m["cpu_flags"] is None or isinstance(m["cpu_flags"], list)


def test_machine_block_records_why_a_compiler_is_unknown(monkeypatch):
    def broken():
        raise OSError("no build.json")

    monkeypatch.setattr(anchors, "built_with", broken)
    m = provenance.machine({"commit": None, "changed": []})
    assert m["anchors_compiler"] is None and "no build.json" in m["anchors_compiler_error"]


def test_paired_ratios_pair_rounds_and_skip_missing_ones():
    num = [{"round": 1, "v": 3.0}, {"round": 0, "v": 2.0}, {"round": 2, "v": 1.0}]
    den = [{"round": 0, "v": 4.0}, {"round": 1, "v": 2.0}, {"round": 2, "v": None}]
    assert provenance.paired_ratios(num, den, "v") == [0.5, 1.5]
    p = provenance.paired([0.5, 1.5, 1.0], goal=0.95)
    assert p["median"] == 1.0 and (p["min"], p["max"]) == (0.5, 1.5) and p["goal_met"] and p["rounds_missing_goal"] == 1
    assert provenance.range_cell(p) == "1.000x (0.500-1.500, 3 rounds)"
    assert provenance.paired([])["median"] is None and provenance.range_cell(None) == "-"
