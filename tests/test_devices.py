"""Device profiles and detection: every shipped profile loads, fixture trees pick the right profile,
malformed profiles fail with file:field errors, and this machine is detected."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemed.cli import cli
from edgemed.devices import get_profile, load_profiles
from edgemed.devices.detect import choose, detect
from edgemed.devices.facts import GIB, Facts
from edgemed.errors import PlanError, ProfileError

FIXTURES = Path(__file__).parent / "fixtures" / "devices"

# fixture tree -> (profile it must pick, strings the one-line summary must contain)
EXPECTED = {
    "jetson-orin-nano-8gb": ("jetson-orin-nano-8gb", ["6 cores", "JetPack 6.1", "15W mode"]),
    "jetson-orin-nx-16gb": ("jetson-orin-nx-16gb", ["8 cores", "JetPack 6.0", "MAXN mode"]),
    "jetson-agx-orin-32gb": ("jetson-agx-orin-32gb", ["8 cores", "JetPack 5.1.2", "50W mode"]),
    "jetson-agx-orin-64gb": ("jetson-agx-orin-64gb", ["12 cores", "JetPack 6.2"]),
    # Docker masks /sys/firmware, so /proc/device-tree: no model string, and the generic CPU profile was picked
    "jetson-in-container": ("jetson", ["6 cores", "JetPack 6.1"]),
    "apple-m1": ("apple-m1", ["8 cores"]),
    "apple-m2": ("apple-m2", ["12 cores"]),
    "apple-m3": ("apple-m3", ["16 cores"]),
    "apple-m4": ("apple-m4", ["10 cores"]),
    # a chip no apple-m* profile names: the Apple catch-all, not the generic CPU-only profile
    "apple-m5-pro": ("apple", ["14 cores", "25.8 GB"]),
    "x86-avx2": ("x86-avx2", ["8 cores", "33.5 GB"]),
    "x86-avx512": ("x86-avx512", ["16 cores"]),
    "x86-avx2-container": ("x86-avx2", ["container limit"]),
    "generic-old-x86": ("generic", ["2 cores"]),
    "generic-riscv": ("generic", ["2 cores"]),
}


def test_every_fixture_has_an_expectation():
    assert sorted(p.name for p in FIXTURES.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("tree", sorted(EXPECTED))
def test_fixture_tree_picks_its_profile(tree):
    profile_name, summary_parts = EXPECTED[tree]
    facts = detect(FIXTURES / tree)
    assert choose(facts).name == profile_name
    for part in summary_parts:
        assert part in facts.summary()


def test_every_shipped_profile_is_picked_by_some_fixture():
    picked = {name for name, _ in EXPECTED.values()}
    assert set(load_profiles()) == picked


def test_apple_threads_are_performance_cores_and_budget_is_working_set():
    facts = detect(FIXTURES / "apple-m2")
    profile = choose(facts)
    assert facts.performance_cores == 8 and facts.physical_cores == 12
    assert profile.threads(profile.llama["n_threads"], facts) == 8
    total = 16 * GIB
    assert profile.budget_bytes(facts) == int(min(total - 3 * GIB, total * 0.67))


def test_a_mac_with_a_chip_no_profile_names_gets_the_apple_catch_all():
    """An "Apple M5 Pro" got the generic profile: CPU only (n_gpu_layers 0, no Metal), a budget of 0.75 of its RAM
    instead of Metal's working set. The catch-all `apple` profile takes any Mac the chip profiles leave, with the
    newest M-series profile's settings, and never wins over a chip profile."""
    facts = Facts(platform="apple", model="Apple M5 Pro", physical_cores=14, performance_cores=10,
                  memory_bytes=24 * GIB)
    profile = choose(facts)
    assert profile.name == "apple" and profile.llama["n_gpu_layers"] == -1 and profile.memory["unified"]
    assert profile.budget_bytes(facts) == int(min(24 * GIB - 3 * GIB, 24 * GIB * 0.67))
    assert profile.threads(profile.llama["n_threads"], facts) == 10
    profiles = load_profiles()
    chips = [p for name, p in profiles.items() if name.startswith("apple-m")]
    newest = max(chips, key=lambda p: int(p.name.removeprefix("apple-m")))
    for section in ("memory", "llama", "onnx"):
        assert getattr(profile, section) == getattr(newest, section), section
    assert profile.recommended_quant == newest.recommended_quant
    assert all(p.priority > profile.priority for p in chips)
    assert choose(Facts(platform="apple", model="Apple Silicon", memory_bytes=8 * GIB)).name == "apple"  # name unread
    for chip in chips:  # every chip profile still wins on its own chip
        assert choose(replace(facts, model=chip.match["model_contains"][0] + " Max")).name == chip.name
        assert choose(replace(facts, model=chip.match["model_contains"][0])).name == chip.name
    for later in ("Apple M10", "Apple M11 Pro", "Apple M40 Max"):  # a name holds a chip's only as whole words
        assert choose(replace(facts, model=later)).name == "apple", later


@pytest.mark.parametrize("wired_mb, profile_name, want_gib", [
    (0, "apple-m2", 16 * 0.67),        # not set: Metal's default working set, the profile's max_fraction
    (12288, "apple-m2", 12.0),         # raised: the model may use up to the limit (still under RAM less the reserve)
    (15360, "apple-m2", 13.0),         # raised past RAM less the reserve: the reserve still holds
    (6144, "apple-m2", 6.0),           # lowered: the GPU cannot wire more than that
    (6144, "generic", 16 * 0.75),      # a CPU-only profile here: nothing goes to the GPU, the limit plays no part
])
def test_an_operators_gpu_wired_limit_is_the_apple_budgets_cap(tmp_path, wired_mb, profile_name, want_gib):
    """`sysctl iogpu.wired_limit_mb` was read into the facts' details and used nowhere: a Mac whose operator raised
    the GPU's wired-memory limit for a bigger model was planned at two thirds of its RAM all the same."""
    text = (FIXTURES / "apple-m2" / "sysctl.txt").read_text().replace("iogpu.wired_limit_mb: 0",
                                                                      f"iogpu.wired_limit_mb: {wired_mb}")
    (tmp_path / "sysctl.txt").write_text(text)
    facts = detect(tmp_path)
    assert facts.gpu_wired_limit_bytes == (wired_mb << 20 or None)
    profile = get_profile(profile_name)
    assert profile.budget_bytes(facts, here=True) == int(min(16 * GIB - profile.memory["reserve_gb"] * GIB,
                                                             want_gib * GIB))
    if profile_name == "apple-m2":
        assert choose(facts).name == "apple-m2" and profile.budget_bytes(facts) == profile.budget_bytes(facts, True)
    # planned for a Mac from another machine (or for another device from this Mac): this Mac's limit is not read
    assert get_profile("apple-m2").budget_bytes(Facts(platform="x86", memory_bytes=16 * GIB)) == int(16 * GIB * 0.67)
    assert get_profile("jetson-orin-nano-8gb").budget_bytes(facts) == get_profile("jetson-orin-nano-8gb").budget_bytes(None)


def test_cgroup_limit_caps_the_budget():
    facts = detect(FIXTURES / "x86-avx2-container")
    assert facts.memory_limit_bytes == 4 * GIB
    assert facts.usable_memory_bytes == 4 * GIB
    assert choose(facts).budget_bytes(facts) == int(min(4 * GIB - 2 * GIB, 4 * GIB * 0.85))


@pytest.mark.parametrize("version", [1, 2])
def test_the_cgroup_reader_takes_the_tightest_limit_and_its_room(tmp_path, version):
    """Every group from the process's up to the hierarchy's root may limit it: the tightest applies, and the room
    under it is the limit less what the group uses, its reclaimable page cache counted as room."""
    from edgemed.devices.cgroup import least_room, limits, tightest_limit
    from edgemed.devices.facts import Host, cgroup_limit

    proc = tmp_path / "proc/self"
    proc.mkdir(parents=True)
    if version == 2:
        (proc / "cgroup").write_text("0::/user.slice/job\n")
        (proc / "mountinfo").write_text("30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
        group, files = tmp_path / "sys/fs/cgroup/user.slice/job", ("memory.max", "memory.current", "inactive_file")
        top_limit = "max"
    else:
        (proc / "cgroup").write_text("4:memory:/jobs/job\n1:cpu:/\n")
        (proc / "mountinfo").write_text("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
        group = tmp_path / "sys/fs/cgroup/memory/jobs/job"
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        top_limit = str(9223372036854771712)  # v1's "no limit"
    group.mkdir(parents=True)
    (group / files[0]).write_text(str(8 * GIB))
    (group / files[1]).write_text(str(3 * GIB))
    (group / "memory.stat").write_text(f"{files[2]} {1 * GIB}\nanon 0\n")
    (group.parent / files[0]).write_text(str(12 * GIB))  # a parent's looser limit, its usage unreadable
    (group.parent.parent / files[0]).write_text(top_limit)
    host = Host(tmp_path)
    assert sorted(lim.bytes for lim in limits(host)) == [8 * GIB, 12 * GIB]
    assert tightest_limit(host).bytes == cgroup_limit(host) == 8 * GIB
    room = least_room(host)
    assert room.room == 6 * GIB and room.where.endswith(f"job/{files[0]}") and not room.where.startswith(str(tmp_path))
    assert least_room(Host(tmp_path / "nowhere")) is None and cgroup_limit(Host(tmp_path / "nowhere")) is None


@pytest.mark.parametrize("version", [1, 2])
def test_a_container_cpu_quota_or_cpuset_caps_the_threads(tmp_path, version):
    """`docker --cpus=2` or `--cpuset-cpus=0-1` on a 16-core host: llama.cpp was given 16 threads, which then spin on
    each other's barriers. The cgroup's quota (rounded up) and cpuset count now cap the profile's "physical"."""
    import shutil

    from edgemed.devices.cgroup import cpu_limit
    from edgemed.devices.facts import Host

    root = tmp_path / "box"
    shutil.copytree(FIXTURES / "x86-avx2-container", root)
    proc = root / "proc/self"
    if version == 2:
        (proc / "cgroup").write_text("0::/docker/abc\n")
        group = root / "sys/fs/cgroup/docker/abc"
        group.mkdir(parents=True)
        (group / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs: 3 threads
        (group / "cpuset.cpus.effective").write_text("0-7,12\n")
        (group.parent / "cpu.max").write_text("max 100000\n")
        want, where = 3, "docker/abc/cpu.max"
    else:
        (proc / "cgroup").write_text("4:memory:/\n3:cpuset:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
        (proc / "mountinfo").write_text("34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
                                        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n")
        cpus = root / "sys/fs/cgroup/cpu,cpuacct/docker/abc"
        cpus.mkdir(parents=True)
        (cpus / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
        (cpus / "cpu.cfs_period_us").write_text("100000\n")
        cpuset = root / "sys/fs/cgroup/cpuset/docker/abc"
        cpuset.mkdir(parents=True)
        (cpuset / "cpuset.cpus").write_text("2-3\n")
        want, where = 2, "docker/abc/cpuset.cpus"
    n, said = cpu_limit(Host(root))
    assert n == want and said.endswith(where) and not said.startswith(str(root))
    facts = detect(root)
    assert facts.physical_cores == 8 and facts.cpu_limit == want and facts.usable_cores == want
    profile = choose(facts)
    assert profile.threads("physical", facts) == want and f"8 cores ({want} usable here)" in facts.summary()
    r = CliRunner().invoke(cli, ["devices", "detect", "--root", str(root), "--json"])
    assert r.exit_code == 0 and '"usable_cores": %d' % want in r.output, r.output


def test_the_engines_own_thread_count_keeps_to_the_cpus_allowed(monkeypatch):
    """Where no profile says (quickstart's demo model, the batcher and the logits reader given no threads), the
    engine counted the cores in /proc/cpuinfo alone: a container given 2 CPUs on a 64-core host ran 64 threads.
    It takes detection's count now (``usable_cores``), as a profile's "physical" does."""
    from edgemed.devices import detect as detection
    from edgemed.runtime import llamacpp

    root = FIXTURES / "x86-avx512"  # 16 cores, 32 logical CPUs
    monkeypatch.setattr(detection, "cpus_allowed", lambda host: 2)
    assert llamacpp.physical_cores(root) == 2
    monkeypatch.setattr(detection, "cpus_allowed", lambda host: None)  # nothing narrows them
    assert llamacpp.physical_cores(root) == 16
    monkeypatch.setattr(detection, "cpus_allowed", lambda host: 32)  # SMT siblings allowed are not cores
    assert llamacpp.physical_cores(root) == 16


def test_cpu_limits_that_are_not_limits_or_not_numbers_change_nothing(tmp_path):
    """No quota ("max", -1), an empty or garbled cpuset, digits int() refuses ("²"), and a group path that climbs out
    of the hierarchy (`..`, whose files are never read) leave the cores as they are."""
    from edgemed.devices.cgroup import cpu_limit, cpuset_size, limits
    from edgemed.devices.facts import Host

    assert [cpuset_size(t) for t in ("0-3,8", "5", "0-1,1", "", "3-1", "a", "0-99999999", " 0-1\n")] == [5, 1, 2, 0, 0,
                                                                                                          0, 0, 2]
    proc = tmp_path / "proc/self"
    proc.mkdir(parents=True)
    (proc / "mountinfo").write_text("30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    group = tmp_path / "sys/fs/cgroup/g"
    group.mkdir(parents=True)
    for quota, cpuset, memory in [("max 100000", "", "max"), ("\u00b2 100000", "x-y", "\u00b2"), ("0 100000", "9-2", "")]:
        (proc / "cgroup").write_text("0::/g\n")
        (group / "cpu.max").write_text(quota)
        (group / "cpuset.cpus.effective").write_text(cpuset)
        (group / "memory.max").write_text(memory)
        assert cpu_limit(Host(tmp_path)) is None and limits(Host(tmp_path)) == [], quota
    (group / "cpu.max").write_text("100000 100000")
    (group / "memory.max").write_text(str(GIB))
    assert cpu_limit(Host(tmp_path))[0] == 1 and limits(Host(tmp_path))[0].bytes == GIB
    (proc / "cgroup").write_text("0::/../../g\n")  # would reach past the mount
    assert cpu_limit(Host(tmp_path)) is None and limits(Host(tmp_path)) == []


def test_detection_never_reads_a_fifo_a_device_or_a_huge_file(tmp_path):
    """`devices detect --root` with a FIFO for /proc/cpuinfo hung, and a link from /proc/meminfo to /dev/zero ended in
    a MemoryError: each is now read as absent (the files are the machine's; a fixture tree is anyone's)."""
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "box"
    shutil.copytree(FIXTURES / "x86-avx2", root)
    (root / "proc" / "cpuinfo").unlink()
    os.mkfifo(root / "proc" / "cpuinfo")
    (root / "proc" / "meminfo").unlink()
    (root / "proc" / "meminfo").symlink_to("/dev/zero")
    (root / "etc").mkdir(exist_ok=True)
    with open(root / "etc" / "nv_tegra_release", "wb") as fh:  # 5 MiB, as a hole: past the bound
        fh.truncate(5 << 20)
    code = f"from edgemed.devices.detect import detect; f = detect({str(root)!r}); print(f.platform, f.memory_bytes)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("detection waited on a FIFO")
    assert proc.returncode == 0 and proc.stdout.split() == ["generic", "0"], proc.stderr[-2000:]


@pytest.mark.parametrize("line", ["MemTotal:       abc kB", "MemTotal:", "MemTotal: \u00b2\u00b3 kB",
                                  "MemTotal: 999999999999999999999999999 kB", "MemTotal: 12 MB",
                                  "MemTotal:              0 kB"])
def test_a_memtotal_that_is_not_a_size_counts_as_unknown(tmp_path, caplog, line):
    """A MemTotal of "abc", none or "²³" stopped `devices detect --root` with a traceback, and one of 10^27 kB was
    taken as 10^21 GB that every plan fitted. Each now counts as unknown, with a warning naming it; so does one of
    0 kB, which counted as unknown without a word. The refusal on the device names `plan --budget-mb`, the fix that
    plans there (it said "run on the device itself", to a user on it)."""
    import logging
    import shutil

    root = tmp_path / "box"
    shutil.copytree(FIXTURES / "x86-avx2", root)
    (root / "proc" / "meminfo").write_text(line + "\nMemAvailable:   6000000 kB\n")
    with caplog.at_level(logging.WARNING, logger="edgemed.devices.facts"):
        assert detect(root).memory_bytes == 0
    assert _warnings(caplog, "MemTotal")
    result = CliRunner().invoke(cli, ["devices", "detect", "--root", str(root)])
    assert result.exit_code == 1 and "memory is unknown" in result.output, result.output
    assert "--budget-mb N" in result.output and "run on the device itself" not in result.output, result.output
    (root / "proc" / "meminfo").write_text("MemTotal:       32714472 kB\n")  # a real one still reads
    assert detect(root).memory_bytes == 32714472 * 1024


def test_a_cgroup_figure_of_thousands_of_digits_is_no_limit(tmp_path):
    """int() refuses a string of more than 4300 digits: a memory.max of 5000 stopped detection with a ValueError."""
    root = _container(tmp_path, 0)
    (root / "sys/fs/cgroup/memory.max").write_text("9" * 5000 + "\n")
    assert detect(root).memory_limit_bytes is None


@pytest.mark.parametrize("key", ["hw.memsize", "hw.physicalcpu", "hw.logicalcpu", "iogpu.wired_limit_mb"])
def test_an_apple_sysctl_value_with_a_non_ascii_digit_counts_as_absent(tmp_path, key):
    """str.isdigit() takes "²", which int() refuses: `devices detect` on such a sysctl.txt ended in a traceback."""
    import re
    import shutil

    root = tmp_path / "mac"
    shutil.copytree(FIXTURES / "apple-m1", root)
    text = (root / "sysctl.txt").read_text()
    (root / "sysctl.txt").write_text(re.sub(rf"^{re.escape(key)}:.*$", f"{key}: \u00b2", text, flags=re.M))
    facts = detect(root)
    assert facts.platform == "apple"
    if key == "hw.memsize":
        assert facts.memory_bytes == 0
    elif key == "iogpu.wired_limit_mb":
        assert facts.gpu_wired_limit_bytes is None
    else:
        assert facts.physical_cores >= 1 and facts.logical_cores >= 1


#: What every unknown-memory warning says besides its source: what a plan does without the size, and the fix.
UNKNOWN_MEMORY = ("this machine's memory counts as unknown: a plan takes the device profile's memory.total_gb unchecked "
                  "against this machine, and a profile without one is refused. Fix: pass `edgemed plan MODEL "
                  "--budget-mb N`")


def test_a_meminfo_missing_or_without_memtotal_is_unknown_with_one_warning(tmp_path, caplog):
    """A missing /proc/meminfo, or one without a MemTotal line, gave 0 ("unknown") without a word, while a malformed
    MemTotal warned: the plan then took the profile's size unchecked, or was refused, with nothing saying why. Each
    warns now, once however often the machine is read, naming the file, what a plan does without it and the fix."""
    import logging

    from edgemed.devices.facts import Host, meminfo_total

    host, path = Host(tmp_path), tmp_path / "proc" / "meminfo"
    with caplog.at_level(logging.WARNING, logger="edgemed.devices.facts"):
        assert meminfo_total(host) == 0 and meminfo_total(host) == 0
        path.parent.mkdir()
        path.write_text("MemFree:         8000000 kB\nMemAvailable:    6000000 kB\n")
        assert meminfo_total(host) == 0 and detect(tmp_path).memory_bytes == 0
    said = _warnings(caplog, "memory counts as unknown")
    assert len(said) == 2, said
    assert said[0].startswith(f"{path} cannot be read (missing, or not a readable file); {UNKNOWN_MEMORY}"), said
    assert said[1].startswith(f"{path} has no MemTotal line; {UNKNOWN_MEMORY}"), said
    assert said[0].endswith("name a profile with memory.total_gb (--profile)")


@pytest.mark.parametrize("memsize,says", [(None, "is missing"), ("0", "is '0', not a size")], ids=["missing", "zero"])
def test_an_apple_memsize_missing_or_0_is_unknown_with_one_warning(tmp_path, caplog, memsize, says):
    """An Apple hw.memsize of 0, or none, gave 0 ("unknown") without a word."""
    import logging

    from edgemed.devices import apple
    from edgemed.devices.facts import Host

    values = {"hw.optional.arm64": "1", "machdep.cpu.brand_string": "Apple M2", "hw.physicalcpu": "8",
              "hw.memsize": memsize}
    host = Host(tmp_path, sysctl=values.get)
    with caplog.at_level(logging.WARNING, logger="edgemed.devices.facts"):
        assert apple.probe(host).memory_bytes == 0 and apple.probe(host).memory_bytes == 0
    said = _warnings(caplog, "memory counts as unknown")
    assert len(said) == 1 and said[0].startswith(f"sysctl hw.memsize (of the machine at {tmp_path}) {says}; "
                                                 + UNKNOWN_MEMORY), said
    values["hw.memsize"] = str(16 * GIB)
    assert apple.probe(host).memory_bytes == 16 * GIB


def test_detect_shows_the_device_strings_escaped(tmp_path):
    """`devices detect --root` printed the device-tree model raw: an OSC sequence in it set the terminal's title (and
    could rewrite the lines around it). The model and the power mode's name are shown escaped, as a bundle's text is."""
    import shutil

    root = tmp_path / "jet"
    shutil.copytree(FIXTURES / "jetson-orin-nano-8gb", root)
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x1b]0;pwned\x07RED\x00")
    conf = root / "etc/nvpmodel.conf"
    conf.write_text(conf.read_text().replace("NAME=15W", "NAME=15W\x1b[2K"))
    result = CliRunner().invoke(cli, ["devices", "detect", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "Kit\\x1b]0;pwned\\x07RED" in result.output and "15W\\x1b[2K mode" in result.output


def test_jetson_uses_fixed_memory_and_offloads_everything():
    profile = get_profile("jetson-orin-nano-8gb")
    assert profile.budget_bytes(None) == int(min(7.4 * GIB - 1.5 * GIB, 7.4 * GIB * 0.8))
    assert profile.llama["n_gpu_layers"] == -1 and profile.llama["flash_attn"] is True


def test_a_module_with_less_memory_than_its_profile_plans_with_what_it_has(tmp_path):
    """An Orin Nano with 6.1 GiB (inside the profile's match range) got the profile's fixed 7.4 GiB: a budget of
    nearly all its RAM. On the device the smaller of the two counts; planned from another machine, the profile's."""
    import shutil

    nano = tmp_path / "nano"
    shutil.copytree(FIXTURES / "jetson-orin-nano-8gb", nano)
    (nano / "proc" / "meminfo").write_text("MemTotal:       6400000 kB\nMemAvailable:   6000000 kB\n")
    facts = detect(nano)
    profile = get_profile("jetson-orin-nano-8gb")
    assert profile.matches(facts)
    assert profile.total_memory_bytes(facts) == 6400000 * 1024
    assert profile.budget_bytes(facts) == int(min(6400000 * 1024 - 1.5 * GIB, 6400000 * 1024 * 0.8))
    big = detect(FIXTURES / "apple-m3")  # another machine: the profile's own size
    assert not profile.matches(big) and profile.total_memory_bytes(big) == int(7.4 * GIB)


def test_a_profile_named_for_another_device_plans_for_it_and_loads_within_this_one(smollm2_gguf):
    """`plan --profile jetson-agx-orin-64gb` from a 4 GiB container planned a budget of 0 (the container's limit
    capped the module's 64 GB), and `run --profile jetson-agx-orin-64gb` on an 8 GB Orin Nano planned 53 GB and would
    have loaded into memory the board does not have. Planning for a device ignores this machine; loading here never
    plans more than this machine may use."""
    from edgemed.runtime.plan import make_plan
    from edgemed.runtime.session import prepare

    agx = get_profile("jetson-agx-orin-64gb")
    container, nano = detect(FIXTURES / "x86-avx2-container"), detect(FIXTURES / "jetson-orin-nano-8gb")
    off_device = agx.budget_bytes(None)
    assert agx.budget_bytes(container) == agx.budget_bytes(nano) == off_device > 40 * GIB
    assert make_plan(smollm2_gguf, agx, container).budget == off_device
    here = prepare(smollm2_gguf, "jetson-agx-orin-64gb", root=FIXTURES / "jetson-orin-nano-8gb").plan.budget
    assert here == agx.budget_bytes(nano, here=True) < nano.usable_memory_bytes
    with pytest.raises(PlanError) as err:  # its 8 GiB reserve leaves nothing of a 4 GiB container
        prepare(smollm2_gguf, "jetson-agx-orin-64gb", root=FIXTURES / "x86-avx2-container")
    assert "capped at the 4.0 GiB this machine may use (its container limit)" in err.value.problem


@pytest.mark.parametrize("name", ["jetson", "apple"])
def test_a_profile_sized_by_its_device_is_not_sized_by_the_machine_planning_for_it(smollm2_gguf, name):
    """`plan --profile jetson` on a 33 GB workstation planned a budget of most of the workstation's RAM (the smallest
    Jetson has under 4 GiB) and the workstation's 8 cores as the device's threads. Off the device its memory is
    unknown: the plan asks for --budget-mb, and threads stay the device's to resolve."""
    pc = ["--root", str(FIXTURES / "x86-avx2")]
    refused = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--profile", name, *pc])
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
    assert f"Profile '{name}' takes its memory size from the device" in refused.output
    assert "--budget-mb" in " ".join(refused.output.split())
    given = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--profile", name, "--budget-mb", "3000", *pc])
    assert given.exit_code == 0, given.output
    threads = get_profile(name).llama["n_threads"]  # "physical", or an Apple's "performance"
    assert "(budget 3000 MiB)" in given.output and f"n_threads={threads} (the device's)" in given.output
    fixed = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--profile", "jetson-agx-orin-64gb", *pc])
    assert fixed.exit_code == 0 and "n_threads=physical (the device's)" in fixed.output, fixed.output


def test_on_the_device_an_unknown_memory_is_planned_with_budget_mb(tmp_path, smollm2_gguf):
    """`plan` on a device whose memory detection could not read (here a MemTotal of 0 kB) told the user, who was on
    the device, to "run on the device itself"; `--budget-mb`, the flag that plans there, went unnamed. The refusal
    names it, and the plan with it is made."""
    import shutil

    root = tmp_path / "box"
    shutil.copytree(FIXTURES / "x86-avx2", root)
    (root / "proc" / "meminfo").write_text("MemTotal:              0 kB\n")
    refused = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--root", str(root)])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "Profile 'x86-avx2' has no fixed memory size" in text, refused.output
    assert "Fix: pass `edgemed plan MODEL --budget-mb N`" in text and "run on the device itself" not in text, text
    given = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--root", str(root), "--budget-mb", "3000"])
    assert given.exit_code == 0 and "(budget 3000 MiB)" in given.output, given.output


def test_a_profile_sized_by_its_device_plans_with_that_device_facts(smollm2_gguf):
    """On the device (or a copy of its /proc) the catch-all takes its memory and cores, as before."""
    from edgemed.runtime.plan import make_plan

    jetson, box = get_profile("jetson"), detect(FIXTURES / "jetson-in-container")
    plan = make_plan(smollm2_gguf, jetson, box)
    assert plan.budget == jetson.budget_bytes(box) > 0 and plan.llama["n_threads"] == box.usable_cores == 6


def _container(tmp_path, limit: int) -> Path:
    """The x86 container fixture with its cgroup memory limit set to ``limit`` bytes."""
    import shutil

    root = tmp_path / "box"
    shutil.copytree(FIXTURES / "x86-avx2-container", root)
    (root / "sys/fs/cgroup/memory.max").write_text(f"{limit}\n")
    return root


def test_a_reserve_that_takes_the_whole_container_is_named_with_the_fixes_that_make_room(smollm2_gguf, tmp_path):
    """x86-avx2 keeps 2 GiB for the OS; in a 2 GiB container that left a budget of 0, and every model was refused with
    "use a smaller quant", which no quant can satisfy. The refusal names the reserve and the container limit, and the
    fixes that give a model room."""
    root = _container(tmp_path, 2 * GIB)
    assert get_profile("x86-avx2").budget_bytes(detect(root)) == 0
    result = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--root", str(root)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "budget of 0 MiB" in text
    assert ("memory.reserve_gb 2.0 GiB (kept for the OS and the software beside the model) of the 2.0 GiB this "
            "machine may use (its container limit) leaves nothing for a model") in text
    fix = text.split("Fix:", 1)[1]
    assert "higher container memory limit" in fix and "smaller memory.reserve_gb" in fix and "EDGEMED_PROFILES_DIR" in fix
    assert "--budget-mb" in fix and "smaller quant" not in fix  # a budget of 0 fits no quant


def test_a_reserve_that_leaves_too_little_puts_room_before_a_smaller_quant(smollm2_gguf, tmp_path):
    """50 MiB left after the reserve: the model would fit without it, so the reserve is named and making room comes
    first; a smaller quant stays among the fixes. With room enough the plan goes through unchanged."""
    from edgemed.runtime.plan import make_plan

    root = _container(tmp_path, 2 * GIB + 50 * (1 << 20))
    with pytest.raises(PlanError) as err:
        make_plan(smollm2_gguf, get_profile("x86-avx2"), detect(root))
    assert "memory.reserve_gb 2.0 GiB" in err.value.problem and "the 2.05 GiB this machine may use" in err.value.problem
    assert "leaves 50 MiB for a model" in err.value.problem
    assert err.value.fix.startswith("give the model room: a higher container memory limit")
    assert "smaller quant" in err.value.fix
    roomy = _container(tmp_path / "roomy", 4 * GIB)
    assert make_plan(smollm2_gguf, get_profile("x86-avx2"), detect(roomy)).fits


def test_detect_says_why_a_container_leaves_no_budget(tmp_path):
    """`devices detect` in a 2 GiB container printed "memory budget for a model: 0.0 GB" and nothing else: the budget
    line is followed by the reserve that empties it and the fixes that make room (its JSON carries them too). A budget
    that shows as more than 0.0 GB gets no note."""
    import json

    root = _container(tmp_path, 2 * GIB)
    result = CliRunner().invoke(cli, ["devices", "detect", "--root", str(root)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if "memory budget for a model: 0.0 GB" in line)
    assert lines[at + 1] == ("  memory.reserve_gb 2.0 GiB (kept for the OS and the software beside the model) of the "
                             "2.0 GiB this machine may use (its container limit) leaves nothing for a model.")
    assert lines[at + 2].startswith("  Fix: give the model room: a higher container memory limit")
    assert "smaller memory.reserve_gb" in lines[at + 2] and "--budget-mb" in lines[at + 2]
    data = json.loads(CliRunner().invoke(cli, ["devices", "detect", "--root", str(root), "--json"]).output)
    assert data["budget_bytes"] == 0 and "leaves nothing for a model" in data["budget_note"]["problem"]
    assert data["budget_note"]["fix"].startswith("give the model room")
    little = _container(tmp_path / "little", 2 * GIB + 30 * (1 << 20))  # 0.03 GB left: shown as 0.0 GB
    assert "leaves 30 MiB for a model." in CliRunner().invoke(cli, ["devices", "detect", "--root", str(little)]).output
    roomy = _container(tmp_path / "roomy", 4 * GIB)
    shown = CliRunner().invoke(cli, ["devices", "detect", "--root", str(roomy)])
    assert "memory budget for a model: 2.1 GB" in shown.output and "reserve_gb" not in shown.output, shown.output
    assert json.loads(CliRunner().invoke(cli, ["devices", "detect", "--root", str(roomy), "--json"]).output)[
        "budget_note"] is None


def test_this_machine_is_detected():
    facts = detect("/")
    profile = choose(facts)
    assert profile.matches(facts)
    assert facts.physical_cores >= 1 and facts.memory_bytes > 0
    result = CliRunner().invoke(cli, ["devices", "detect"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(profile.name + " (")


def test_cli_detect_on_fixture_root_and_json():
    result = CliRunner().invoke(cli, ["devices", "detect", "--root", str(FIXTURES / "jetson-orin-nano-8gb")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("jetson-orin-nano-8gb (6 cores, 8.0 GB, JetPack 6.1, 15W mode)")
    import json

    data = json.loads(CliRunner().invoke(cli, ["devices", "detect", "--json", "--root", str(FIXTURES / "apple-m3")]).output)
    assert data["profile"] == "apple-m3" and data["performance_cores"] == 12


def test_cli_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(cli, ["devices", "list"])
    assert listed.exit_code == 0
    assert all(name in listed.output for name in load_profiles())
    shown = runner.invoke(cli, ["devices", "show", "x86-avx512"])
    assert shown.exit_code == 0 and 'cpu_flags = ["avx2", "fma", "avx512f", "avx512bw"]' in shown.output
    missing = runner.invoke(cli, ["devices", "show", "pdp-11"])
    assert missing.exit_code == 1 and "edgemed devices list" in missing.output


# -- validation ------------------------------------------------------------------------
GOOD = (Path(__file__).parents[1] / "device_profiles" / "generic.toml").read_text()


def _user_profile(tmp_path, monkeypatch, name: str, text: str) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.toml").write_text(text)
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(folder))


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace("n_ctx = 4096", 'n_ctx = "big"'), "llama.n_ctx"),
    (lambda t: t.replace("n_ctx = 4096", "n_ctx = 4096\nn_ctxx = 1"), "llama.n_ctxx"),
    (lambda t: t.replace("max_fraction = 0.75", "max_fraction = 1.5"), "memory.max_fraction"),
    (lambda t: t.replace('type_k = "f16"', 'type_k = "q3"'), "llama.type_k"),
    (lambda t: t.replace('n_threads = "physical"', 'n_threads = "all"'), "llama.n_threads"),
    (lambda t: t.replace("reserve_gb = 1.0\n", ""), "memory.reserve_gb"),
    (lambda t: t + "\n[cuda]\narch = 87\n", "cuda"),
    (lambda t: t.replace("n_ubatch = 512", "n_ubatch = 1024"), "llama.n_ubatch"),
    (lambda t: t.replace("n_ubatch = 512", "n_ubatch = 512\nn_ubatch_single = 1024"), "llama.n_ubatch_single"),
    (lambda t: t.replace("n_ubatch = 512", "n_ubatch = 512\nn_ubatch_single = 0"), "llama.n_ubatch_single"),
    (lambda t: t.replace('type_v = "f16"', 'type_v = "q8_0"'), "llama.type_v"),  # quantized V with flash_attn false
])
def test_malformed_profile_names_file_and_field(tmp_path, monkeypatch, edit, field):
    text = edit(GOOD.replace('name = "generic"', 'name = "clinic"'))
    _user_profile(tmp_path, monkeypatch, "clinic", text)
    with pytest.raises(ProfileError) as err:
        load_profiles()
    assert str(err.value).startswith(f"clinic.toml: {field}:")
    result = CliRunner().invoke(cli, ["devices", "list"])
    assert result.exit_code == 1 and f"clinic.toml: {field}:" in result.output and "Traceback" not in result.output


def _warnings(caplog, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and word in r.getMessage()]


@pytest.mark.parametrize("count", [2, 8])
def test_inter_op_threads_above_one_are_used_as_one_with_a_warning(tmp_path, monkeypatch, caplog, count):
    """`onnx.inter_op_threads = 8` does nothing: the ONNX engine runs the graph sequentially. Refusing it when the
    profile was read stopped every command on a machine whose profile loaded the day before. It loads as 1, with one
    warning (however often it is read) naming the file, the key, why and the fix; a value that is not an integer
    from 1 is still refused."""
    import logging

    text = GOOD.replace('name = "generic"', 'name = "clinic"')
    assert "inter_op_threads = 1\n" in text
    _user_profile(tmp_path, monkeypatch, "clinic", text.replace("inter_op_threads = 1\n", f"inter_op_threads = {count}\n"))
    with caplog.at_level(logging.WARNING, logger="edgemed.devices.profiles"):
        assert load_profiles()["clinic"].onnx["inter_op_threads"] == 1
        assert get_profile("clinic").onnx["inter_op_threads"] == 1
    said = _warnings(caplog, "inter_op_threads")
    path = tmp_path / "profiles" / "clinic.toml"
    assert len(said) == 1 and said[0].startswith(f"{path}: onnx.inter_op_threads = {count} is used as 1"), said
    assert "sequential mode" in said[0] and f"Fix: set onnx.inter_op_threads = 1 in {path}" in said[0]
    assert "give the threads to onnx.intra_op_threads" in said[0]
    for bad in ("0", "-1", '"2"', "2.0", "true"):
        _user_profile(tmp_path, monkeypatch, "clinic", text.replace("inter_op_threads = 1\n", f"inter_op_threads = {bad}\n"))
        with pytest.raises(ProfileError, match="clinic.toml: onnx.inter_op_threads: expected an integer from 1"):
            get_profile("clinic")


def test_a_profile_that_loaded_before_an_upgrade_stops_no_command(tmp_path, monkeypatch, caplog):
    """A user profile `myonnx.toml` with `onnx.inter_op_threads = 2`, valid until the schema refused it, stopped a
    GGUF command under another, shipped profile, and detection. Both run, with one warning naming the file."""
    import logging

    import bundle_kit as kit

    pytest.importorskip("gguf")
    text = GOOD.replace('name = "generic"', 'name = "myonnx"').replace("inter_op_threads = 1\n", "inter_op_threads = 2\n")
    _user_profile(tmp_path, monkeypatch, "myonnx", text)
    model = kit.tiny_gguf(tmp_path / "tiny.gguf")
    with caplog.at_level(logging.WARNING, logger="edgemed.devices.profiles"):
        result = CliRunner().invoke(cli, ["plan", str(model), "--profile", "x86-avx512", "--budget-mb", "1000"])
        assert result.exit_code == 0, result.output
        assert choose(detect(FIXTURES / "x86-avx512")).name == "x86-avx512"
    said = _warnings(caplog, "inter_op_threads")
    assert len(said) == 1 and "myonnx.toml: onnx.inter_op_threads = 2 is used as 1" in said[0], said


def test_a_profile_that_does_not_read_stops_only_what_uses_it(tmp_path, monkeypatch, caplog):
    """One user file that did not read stopped every command, whatever profile it ran under. It stops what names it,
    never letting the shipped profile it overrides stand in, and what weighs every profile (detection: it might be
    the one that should win; `devices list`). Anything else runs, with one warning per file naming it and the fix."""
    import logging

    from edgemed.packaging.facts import memory_needs

    import bundle_kit as kit

    pytest.importorskip("gguf")
    _user_profile(tmp_path, monkeypatch, "clinic",
                  GOOD.replace('name = "generic"', 'name = "clinic"').replace("n_ctx = 4096", 'n_ctx = "big"'))
    x86 = (Path(__file__).parents[1] / "device_profiles" / "x86-avx2.toml").read_text()
    _user_profile(tmp_path, monkeypatch, "x86-avx2", x86.replace("n_ctx = 8192", "n_ctx = 8192\nn_ctxx = 1"))
    model = kit.tiny_gguf(tmp_path / "tiny.gguf")
    runner = CliRunner()
    with caplog.at_level(logging.WARNING, logger="edgemed.devices.profiles"):
        result = runner.invoke(cli, ["plan", str(model), "--profile", "generic", "--budget-mb", "1000"])
        assert result.exit_code == 0, result.output
        assert get_profile("x86-avx512").name == "x86-avx512"
        needs = memory_needs(model, {"format": "gguf"}, model.stat().st_size)["profiles"]
        assert "generic" in needs and "clinic" not in needs and "x86-avx2" not in needs
    said = _warnings(caplog, "is left out")
    assert len(said) == 2, said
    for name, field in (("clinic", "llama.n_ctx"), ("x86-avx2", "llama.n_ctxx")):
        path = tmp_path / "profiles" / f"{name}.toml"
        assert [m for m in said if m.startswith(f"Device profile {path} is left out: {name}.toml: {field}:")], said
        assert [m for m in said if f"Fix: fix '{field}' in {name}.toml" in m], said
        used = runner.invoke(cli, ["plan", str(model), "--profile", name, "--budget-mb", "1000"])
        assert used.exit_code == 1 and f"{name}.toml: {field}:" in used.output and "Traceback" not in used.output
    with pytest.raises(ProfileError, match="clinic.toml: llama.n_ctx:"):
        choose(detect(FIXTURES / "x86-avx512"))
    listed = runner.invoke(cli, ["devices", "list"])
    assert listed.exit_code == 1 and "clinic.toml: llama.n_ctx:" in listed.output


def test_bad_toml_and_name_mismatch(tmp_path, monkeypatch):
    _user_profile(tmp_path, monkeypatch, "broken", "name = ")
    with pytest.raises(ProfileError, match="broken.toml: not valid TOML"):
        load_profiles()
    (tmp_path / "profiles" / "broken.toml").unlink()
    _user_profile(tmp_path, monkeypatch, "mine", GOOD)
    with pytest.raises(ProfileError, match="mine.toml: name: 'generic' does not match"):
        load_profiles()


def test_user_profile_is_added_and_wins_detection(tmp_path, monkeypatch):
    text = GOOD.replace('name = "generic"', 'name = "our-clinic-pc"').replace("priority = 0", "priority = 99")
    text = text.replace('platform = "any"', 'platform = "x86"\nmodel_contains = ["i7-10700"]')
    _user_profile(tmp_path, monkeypatch, "our-clinic-pc", text)
    assert choose(detect(FIXTURES / "x86-avx2")).name == "our-clinic-pc"
    assert choose(detect(FIXTURES / "x86-avx512")).name == "x86-avx512"


def test_a_platform_that_is_not_one_is_refused_in_a_profile(tmp_path, monkeypatch):
    """`platform = "X86"` passed the schema and matched nothing, so its profile was never picked, without a word."""
    text = (FIXTURES.parent.parent.parent / "device_profiles" / "x86-avx2.toml").read_text()
    _user_profile(tmp_path, monkeypatch, "x86-avx2", text.replace('platform = "x86"', 'platform = "X86"'))
    with pytest.raises(ProfileError, match="match.platform.*one of 'jetson', 'apple', 'x86', 'generic', 'any'"):
        load_profiles()


def test_no_profile_matches_without_generic():
    facts = Facts(platform="jetson", model="Jetson Xavier", memory_bytes=4 * GIB)
    profiles = {k: v for k, v in load_profiles().items() if k not in ("generic", "jetson")}
    with pytest.raises(ProfileError, match="--profile"):
        choose(facts, profiles)


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_a_profiles_folder_named_in_the_variable_must_be_one(tmp_path, monkeypatch, edgemed_home, kind):
    """`EDGEMED_PROFILES_DIR=/no-such-dir` was skipped without a word: the shipped profiles loaded, and detection
    picked one of them instead of the site's own. A folder the variable names must be one; the default
    `$EDGEMED_HOME/profiles` may be absent."""
    import os

    good = tmp_path / "site-profiles"
    good.mkdir()
    (good / "clinic.toml").write_text(GOOD.replace('name = "generic"', 'name = "clinic"'))
    bad = tmp_path / "no-such-dir"
    if kind == "a file":
        bad.write_text("")
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", f"{good}{os.pathsep}{bad}")
    with pytest.raises(ProfileError) as err:
        load_profiles()
    said = "is not a folder" if kind == "a file" else "does not exist"
    assert f"Profile folder {bad} (from $EDGEMED_PROFILES_DIR) {said}" in err.value.problem
    assert "$EDGEMED_PROFILES_DIR" in err.value.fix and str(bad) in err.value.fix
    result = CliRunner().invoke(cli, ["devices", "list"])
    assert result.exit_code == 1 and said in result.output and "Traceback" not in result.output
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(good))
    assert "clinic" in load_profiles()
    monkeypatch.delenv("EDGEMED_PROFILES_DIR")
    assert not (edgemed_home / "profiles").exists()  # the default folder absent: no error
    assert "generic" in load_profiles()


def test_a_profiles_folder_named_in_the_variable_wins_over_the_home_folder(tmp_path, monkeypatch, edgemed_home, caplog):
    """A stale `$EDGEMED_HOME/profiles/x86-avx512.toml` silently replaced the one in the folder `$EDGEMED_PROFILES_DIR`
    names, the place the reserve refusal's own fix tells the user to copy a profile to. The named folder wins, and
    one warning names both files; a stale copy that no longer reads stops nothing the named one serves."""
    import logging

    named = tmp_path / "site"
    named.mkdir()
    (edgemed_home / "profiles").mkdir(parents=True)
    shipped = (Path(__file__).parents[1] / "device_profiles" / "x86-avx512.toml").read_text()
    (named / "x86-avx512.toml").write_text(shipped.replace('description = "', 'description = "site: ', 1))
    stale = edgemed_home / "profiles" / "x86-avx512.toml"
    stale.write_text(shipped.replace('description = "', 'description = "stale: ', 1))
    monkeypatch.setenv("EDGEMED_PROFILES_DIR", str(named))
    from edgemed.devices import profiles as module

    monkeypatch.setattr(module, "_SAID", set())
    with caplog.at_level(logging.WARNING, logger="edgemed.devices.profiles"):
        profile = get_profile("x86-avx512")
    assert profile.source == str(named / "x86-avx512.toml") and profile.description.startswith("site: ")
    said = _warnings(caplog, "replaces")
    assert len(said) == 1 and str(named / "x86-avx512.toml") in said[0] and str(stale) in said[0]
    stale.write_text("not = [toml")
    assert load_profiles()["x86-avx512"].source == str(named / "x86-avx512.toml")
    monkeypatch.delenv("EDGEMED_PROFILES_DIR")  # the home folder alone: its file is the user's profile
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profiles()


def test_the_apple_probes_sysctl_runs_no_process_off_macos(monkeypatch):
    """Linux has a ``sysctl`` of its own that knows none of the Apple probe's keys: every context made without a thread
    count ran it twice (about 5 ms) to learn so. Off macOS no process runs; on macOS the real command is asked."""
    import subprocess
    import sys

    from edgemed.devices import facts as facts_module

    ran = []

    def run(argv, **kwargs):
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="8\n", stderr="")

    monkeypatch.setattr(facts_module.subprocess, "run", run)
    monkeypatch.setattr(sys, "platform", "linux")
    assert facts_module._default_sysctl("hw.physicalcpu") is None and ran == []
    detect("/")
    assert not [argv for argv in ran if argv[0] == "sysctl"]
    monkeypatch.setattr(sys, "platform", "darwin")
    assert facts_module._default_sysctl("hw.physicalcpu") == "8" and ran == [["sysctl", "-n", "hw.physicalcpu"]]
