"""Which devices can run it: the runtime planner's answer for GGUF files on every device profile.

    python -m edgemed.benchmarks.plan_devices MODEL.gguf [MODEL.gguf ...] -o benchmarks/results/plan_devices-<name>
    python -m edgemed.benchmarks.plan_devices a.gguf --memory-gb 8 16 32 64 --json

For each file and each device profile (the shipped ones, and a user's from ``$EDGEMED_PROFILES_DIR``), the
planner (``edgemed.runtime.plan``, the same estimate ``edgemed run`` refuses with) searches the largest context
that fits the profile's budget with the profile's load settings (KV cache type, flash attention, offload,
mmap), up to the model's trained context: not the profile's default ``n_ctx``, which is a setting, not a
limit. Profiles with a fixed memory size (``memory.total_gb``: the Jetsons) get one row; the others (x86 PCs,
Apple Macs, generic) are sized by the machine they run on, so they get a row per ``--memory-gb`` size.

Only GGUF headers are read (metadata and the tensor table; ``planner.read_shape``): no weights are loaded,
so a 15 GB file is planned in well under a second. Writes ``<out>.md`` (the table) and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

DEFAULT_MEMORY_GB = (8, 16, 32)


def _facts(memory_gb: float | None):
    """A machine of ``memory_gb`` for the profiles that take their size from the device (None: fixed-size ones)."""
    from edgemed.devices.facts import GIB, Facts

    return None if memory_gb is None else Facts(platform="any", memory_bytes=int(memory_gb * GIB))


def plan_one(shape, profile, memory_gb: float | None) -> dict:
    """The largest context that fits ``profile`` (at ``memory_gb`` when the profile has no fixed size)."""
    from edgemed.errors import PlanError
    from edgemed.runtime.plan import MIB, choose_context, estimate, for_engine, profile_settings

    profile = for_engine(profile, batched=False)  # as `edgemed plan` and `run` plan it
    budget = profile.budget_bytes(_facts(memory_gb))
    settings = profile_settings(profile, shape)
    row = {"profile": profile.name, "memory_gb": memory_gb if memory_gb is not None else profile.memory["total_gb"],
           "budget_mib": round(budget / MIB, 1), "profile_n_ctx": profile.llama["n_ctx"],
           "recommended_quant": profile.recommended_quant, "settings": settings}
    # search up to the model's trained context: the profile's n_ctx is its default, not a limit
    uncapped = dataclasses.replace(profile, llama={**profile.llama, "n_ctx": shape.n_ctx_train})
    try:
        n_ctx, limited_by = choose_context(shape, uncapped, budget)
        limited_by = "model" if limited_by == "profile" else limited_by  # the uncapped profile's n_ctx is the model's
    except PlanError as exc:
        smallest = estimate(shape, min(512, shape.n_ctx_train), **settings)
        return row | {"fits": False, "n_ctx": None, "limited_by": "budget", "peak_mib": round(smallest.total / MIB, 1),
                      "reason": exc.problem}
    est = estimate(shape, n_ctx, **settings)
    default = estimate(shape, min(profile.llama["n_ctx"], shape.n_ctx_train), **settings)
    return row | {"fits": True, "n_ctx": n_ctx, "limited_by": limited_by, "peak_mib": round(est.total / MIB, 1),
                  "estimate_mib": {k: round(v / MIB, 1) for k, v in dataclasses.asdict(est).items() if k != "n_ctx"},
                  "profile_n_ctx_fits": default.total <= budget}


def plan_devices(models: list[Path], memory_gb: tuple[float, ...] = DEFAULT_MEMORY_GB) -> dict:
    """Every model on every profile: ``{"models": [...], "rows": [...]}``."""
    from edgemed.devices.profiles import load_profiles
    from edgemed.runtime.plan import METHOD, MIB, read_shape

    profiles = sorted(load_profiles().values(), key=lambda p: p.name)
    result = {"method": METHOD, "memory_gb": list(memory_gb), "models": [], "rows": []}
    for path in models:
        shape = read_shape(path)
        model = {"file": path.name, "arch": shape.arch, "weights_mib": round(shape.weights_bytes / MIB, 1),
                 "n_ctx_train": shape.n_ctx_train, "n_layer": shape.n_layer, "n_embd": shape.n_embd,
                 "n_head": shape.n_head, "n_head_kv": shape.n_head_kv, "n_vocab": shape.n_vocab}
        result["models"].append(model)
        for profile in profiles:
            sizes = [None] if "total_gb" in profile.memory else list(memory_gb)
            for gb in sizes:
                result["rows"].append({"model": path.name, **plan_one(shape, profile, gb)})
    return result


def _cell(row: dict) -> str:
    if not row["fits"]:
        return f"no: needs {row['peak_mib'] / 1024:.1f} GiB at 512 tokens"
    ctx = f"{row['n_ctx']:,}" + (" (trained max)" if row["limited_by"] == "model" else "")
    return f"{ctx} ctx, {row['peak_mib'] / 1024:.1f} GiB"


def to_markdown(result: dict) -> str:
    """One row per (profile, memory size), one column per model: the largest context that fits and its peak."""
    names = [m["file"] for m in result["models"]]
    keyed = {(r["profile"], r["memory_gb"], r["model"]): r for r in result["rows"]}
    device_rows = list(dict.fromkeys((r["profile"], r["memory_gb"], r["budget_mib"]) for r in result["rows"]))
    lines = [f"Planner `{result['method']}`: largest context (multiple of 256, up to the model's trained context) "
             "that fits each profile's budget with its own load settings, and the predicted peak there.", "",
             "| profile | memory | budget | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for profile, gb, budget in device_rows:
        cells = [_cell(keyed[(profile, gb, n)]) for n in names]
        lines.append(f"| {profile} | {gb:g} GiB | {budget / 1024:.1f} GiB | " + " | ".join(cells) + " |")
    lines += ["", "| model | arch | weights | trained context | layers | hidden | heads (KV) | vocab |",
              "|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(f"| `{m['file']}` | {m['arch']} | {m['weights_mib'] / 1024:.2f} GiB | {m['n_ctx_train']:,} | "
                     f"{m['n_layer']} | {m['n_embd']} | {m['n_head']} ({m['n_head_kv']}) | {m['n_vocab']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="GGUF files (only their headers are read)")
    ap.add_argument("-o", "--out", type=Path, help="write <OUT>.md and <OUT>.json (e.g. benchmarks/results/plan_devices-7b)")
    ap.add_argument("--memory-gb", nargs="+", type=float, default=list(DEFAULT_MEMORY_GB),
                    help="machine sizes for profiles without a fixed memory size (default: 8 16 32)")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = ap.parse_args(argv)

    from edgemed.errors import EdgemedError

    try:
        result = plan_devices(args.models, tuple(args.memory_gb))
    except EdgemedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = to_markdown(result)
    print(json.dumps(result, indent=2) if args.json else text, end="" if not args.json else "\n")
    if args.out:
        from edgemed.files.atomic import write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python -m edgemed.benchmarks.plan_devices " + " ".join(m.name for m in args.models)
        write_text(args.out.with_name(args.out.name + ".md"), f"# Which devices can run it\n\n`{cmd}`\n\n" + text)
        write_text(args.out.with_name(args.out.name + ".json"), json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}.md and {args.out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
