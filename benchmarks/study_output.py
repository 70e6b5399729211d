"""What a study that measures arms in child processes writes, and when it may replace its committed result.

plan_memory (a model x context), run_overhead (a model) and extra_buffers (a file x mode) each write one JSON file
that a results page is built from. An arm that could not run (its model is not installed) or whose child failed is
listed in that file's ``failed`` (the arm and why), and the script exits 1, so a partial run is seen by the shell
or CI, not only in a line on stderr. A run with fewer rows than the committed file at the default ``--out`` holds
does not replace it (its figures are written beside it, ``<name>.partial.json``) unless ``--replace`` says so or
``--out`` names another file. No figure is written as NaN, which is not JSON: an aggregate over no rows is null.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(ap: argparse.ArgumentParser, default: Path) -> None:
    """``--out`` (default: the committed result) and ``--replace``."""
    ap.add_argument("--out", type=Path, default=default, help=f"result file (default: {default.name} in benchmarks/results/)")
    ap.add_argument("--replace", action="store_true",
                    help="replace the default --out even when this run has fewer rows than it holds")


def rows_in(path: Path) -> int | None:
    """The number of rows of a result file, or None when it is missing or unreadable."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("rows")
    except (OSError, ValueError, AttributeError):
        return None
    return len(rows) if isinstance(rows, list) else None


def write(args: argparse.Namespace, default: Path, body: dict, failed: list[dict]) -> int:
    """Write ``body`` with ``failed`` (``[{"arm": ..., "error": ...}]``) to ``args.out``; the exit status: 0, or 1
    when an arm failed or the committed file was kept (the run's figures then go to ``<name>.partial.json``)."""
    from edgemed.files.atomic import write_text

    body = {**body, "failed": failed}
    text = json.dumps(body, indent=2, allow_nan=False) + "\n"  # a NaN raises here, never reaches the file
    out, status = args.out, 0
    before = rows_in(out)
    if out.resolve() == default.resolve() and not args.replace and before is not None and len(body["rows"]) < before:
        out = out.with_name(out.stem + ".partial.json")
        print(f"{args.out} holds {before} rows and this run measured {len(body['rows'])}: it is kept, and this run's "
              f"figures are in {out}. To replace it, pass --replace (or --out another file).", file=sys.stderr)
        status = 1
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    for f in failed:
        print(f"failed: {f['arm']}: {f['error']}", file=sys.stderr)
    return 1 if failed else status


def child_error(proc) -> str:
    """One line for a failed child: its exit status and the last line it wrote to stderr."""
    tail = (proc.stderr or "").strip().splitlines()
    return f"exit {proc.returncode}" + (f": {tail[-1][-300:]}" if tail else "")
