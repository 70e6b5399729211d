"""What the serving studies share: the machine block every result records, and ratios paired by round.

A study runs both servers in interleaved rounds so that each round's two runs see the same load; a ratio is
therefore taken inside a round (edgemed's run / llama-server's run of that round), and the page reports the
median of those per-round ratios and their range, never the best of one server over the best of the other
(which can pair two different rounds, one quiet and one loaded).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Callable


def paired_ratios(num_runs: list[dict], den_runs: list[dict], value: Callable[[dict], float | None] | str) -> list[float]:
    """``value(num) / value(den)`` within each round both ran (runs carry ``round``), in round order; a round where
    either value is missing (or the denominator is 0) is left out. ``value`` is a key or a function of a run."""
    get = (lambda x: x.get(value)) if isinstance(value, str) else value
    den = {x["round"]: get(x) for x in den_runs}
    out = []
    for x in sorted(num_runs, key=lambda x: x["round"]):
        a, b = get(x), den.get(x["round"])
        if a is not None and b:
            out.append(round(a / b, 4))
    return out


def paired(ratios: list[float], goal: float | None = None, at_most: bool = False) -> dict:
    """The median of per-round ratios, their range, and (with a goal) whether the median meets it and how many
    rounds miss it (``at_most``: the ratio must not exceed the goal; else it must reach it)."""
    if not ratios:
        return {"median": None, "min": None, "max": None, "per_round": [], "goal": goal, "goal_met": None,
                "rounds_missing_goal": None}
    ok = (lambda r: r <= goal) if at_most else (lambda r: r >= goal)
    med = round(statistics.median(ratios), 4)
    return {"median": med, "min": min(ratios), "max": max(ratios), "per_round": list(ratios), "goal": goal,
            "goal_met": None if goal is None else ok(med),
            "rounds_missing_goal": None if goal is None else sum(not ok(r) for r in ratios)}


def range_cell(p: dict | None, fmt: str = "{:.3f}") -> str:
    """``median (min-max over n rounds)`` for a ``paired`` summary, "-" without one."""
    if not p or p.get("median") is None:
        return "-"
    n = len(p["per_round"])
    if n == 1:
        return f"{fmt.format(p['median'])}x (1 round)"
    return f"{fmt.format(p['median'])}x ({fmt.format(p['min'])}-{fmt.format(p['max'])}, {n} rounds)"


def _cpu() -> dict:
    try:
        from edgemed.devices.detect import detect

        facts = detect()
        return {"cpu": facts.model, "cpu_flags": sorted(facts.cpu_flags)}
    except Exception as exc:  # noqa: BLE001 -- provenance is best effort; the reason is recorded instead
        return {"cpu": None, "cpu_flags": None, "cpu_error": f"{type(exc).__name__}: {exc}"}


def _compilers() -> dict:
    out: dict = {}
    try:
        from edgemed.benchmarks import anchors

        out["anchors_compiler"] = anchors.built_with()
    except Exception as exc:  # noqa: BLE001
        out["anchors_compiler"] = None
        out["anchors_compiler_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from edgemed.runtime import native_build

        out["runtime_compilers"] = list(native_build.compilers())
    except Exception as exc:  # noqa: BLE001
        out["runtime_compilers"] = None
        out["runtime_compilers_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _llama_cpp_python() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def code_state(paths: tuple[str, ...] = ("edgemed",), root: Path | None = None) -> dict:
    """The edgemed code the servers ran: the git commit and the files under ``paths`` (edgemed/) changed from it (the
    workloads measure the tree as it is), or None outside a git checkout. ``root``: the checkout to read; by default
    the one holding the ``edgemed`` package this process imported, which the servers it starts import too (a clean
    worktree put first on ``PYTHONPATH`` is that worktree, not the checkout this script came from)."""
    if root is None:
        import edgemed

        root = Path(edgemed.__file__).resolve().parent.parent
    return _git_state(root, paths)


def _git_state(root: Path, paths: tuple[str, ...]) -> dict:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "changed": []}
    return {"commit": head.stdout.strip(), "changed": [ln[3:] for ln in dirty.stdout.splitlines()]}


def machine(code: dict | None = None, **extra) -> dict:
    """The machine block of a serving study: CPU count, model and flags, platform, Python, llama-cpp-python's
    version, the compilers of the anchors (llama-server) and of the runtime's llama.cpp, the edgemed commit (and
    files changed from it), and the load averages when it was taken. ``code``: a ``code_state()`` already taken."""
    if code is None:
        code = code_state()
    return {"cpu_count": os.cpu_count(), **_cpu(), "platform": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": _llama_cpp_python(), **_compilers(), "edgemed_commit": code.get("commit"),
            "edgemed_changed": code.get("changed", []), "loadavg_at_save": list(os.getloadavg()),
            "note": "CPU shared with other sessions; load averages are per run", **extra}
