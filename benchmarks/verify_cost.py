"""What verifying a bundle before every load costs: full re-hash vs `sha256sum`, and the fast path.

    python -m edgemed.benchmarks.verify_cost                   # the 1.1 GB Qwen2.5-1.5B GGUF (R1-Distill shape)
    python -m edgemed.benchmarks.verify_cost --model qwen2.5-0.5b-instruct
    python -m edgemed.benchmarks.verify_cost --gguf path/to/model.gguf

Packs the GGUF into a bundle directory (in a temporary folder next to the cache),
then times, each best of --repeat runs with the file in the page cache (a warm-up
read comes first and is not timed):
  - `sha256sum FILE` (coreutils) on the bundle's model file;
  - full verify (`verify_dir(full=True)`: manifest, walk, every byte re-hashed);
  - the fast path (`verify_dir` with the verified cache), in-process, median of 20;
  - `edgemed verify NAME`-style fast path as a fresh process (Python start-up included).
Goals: full verify >= 80 % of sha256sum throughput; fast path < 50 ms.
The figures are written to ``<results-dir>/verify_cost.json`` (``verify_cost-<model>.json`` for another model
or a --gguf file); verify_cost.md beside it quotes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgemed.files.atomic import write_text

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "qwen2.5-1.5b-instruct"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a pip-carried model name (edgemed.converters.source.pip_models)")
    ap.add_argument("--gguf", type=Path, help="use this GGUF instead of --model")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the summary (it is written either way)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    args = ap.parse_args()

    from edgemed import env
    from edgemed.packaging import digest
    from edgemed.packaging.bundle import PackInputs, pack, verify_dir
    from edgemed.packaging.digest import VerifiedCache

    if args.gguf:
        gguf = args.gguf
    else:
        from edgemed.converters.source import pip_models

        gguf = pip_models.gguf_file(args.model)
    work = Path(tempfile.mkdtemp(prefix="verify-cost.", dir=env.cache_dir("bench")))
    try:
        (work / "LICENSE").write_text("benchmark\n")
        bundle = work / "bundle"
        t0 = time.perf_counter()
        pack(PackInputs(model=gguf, license=work / "LICENSE", name="bench"), bundle, as_dir=True)
        pack_s = time.perf_counter() - t0
        model = next((bundle / "model").iterdir())
        size = model.stat().st_size
        subprocess.run(["cat", str(model)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

        sha_s = best_of(lambda: subprocess.run(["sha256sum", str(model)], stdout=subprocess.DEVNULL, check=True), args.repeat)
        full_s = best_of(lambda: verify_dir(bundle, full=True), args.repeat)

        cache_file = work / "verified-cache.json"
        time.sleep(digest.RACY_S + 0.1)  # files younger than the racy window are never cached
        verify_dir(bundle, cache=VerifiedCache(cache_file))  # prime the cache
        fast = []
        for _ in range(20):
            t0 = time.perf_counter()
            v = verify_dir(bundle, cache=VerifiedCache(cache_file))
            fast.append(time.perf_counter() - t0)
            assert v.hashed == [], v.hashed
        probe = ("import time; t=time.perf_counter(); from pathlib import Path; from edgemed.packaging.bundle import verify_dir; "
                 "from edgemed.packaging.digest import VerifiedCache; "
                 f"v=verify_dir(Path({str(bundle)!r}), cache=VerifiedCache(Path({str(cache_file)!r}))); "
                 "assert not v.hashed; print(time.perf_counter()-t)")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        proc_total = time.perf_counter() - t0
        proc_inner = float(out.stdout.strip())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6
    result = {
        "file": str(gguf), "size_bytes": size, "pack_dir_s": round(pack_s, 2),
        "sha256sum_s": round(sha_s, 3), "sha256sum_MBps": round(mb / sha_s),
        "full_verify_s": round(full_s, 3), "full_verify_MBps": round(mb / full_s),
        "full_vs_sha256sum": round(sha_s / full_s, 2),
        "fast_path_ms_median": round(statistics.median(fast) * 1e3, 2), "fast_path_ms_max": round(max(fast) * 1e3, 2),
        "fast_path_new_process_ms": round(proc_inner * 1e3, 1), "new_process_total_ms": round(proc_total * 1e3),
    }
    stem = "verify_cost" if not args.gguf and args.model == DEFAULT_MODEL else f"verify_cost-{args.gguf.stem if args.gguf else args.model}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.results_dir / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results_dir / stem}.json", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"file           {gguf} ({mb:,.1f} MB)")
    print(f"sha256sum      {sha_s:.3f} s  {result['sha256sum_MBps']:,} MB/s   (coreutils, page cache warm, best of {args.repeat})")
    print(f"full verify    {full_s:.3f} s  {result['full_verify_MBps']:,} MB/s   = {result['full_vs_sha256sum']:.2f} x sha256sum "
          f"(goal >= 0.80)")
    print(f"fast path      {result['fast_path_ms_median']:.2f} ms median, {result['fast_path_ms_max']:.2f} ms max (in process; goal < 50 ms)")
    print(f"fast path      {result['fast_path_new_process_ms']:.1f} ms "
          f"in a fresh process incl. imports ({result['new_process_total_ms']} ms with interpreter start-up)")


if __name__ == "__main__":
    main()
