"""The C++ anchors, built from the llama.cpp that edgemed's runtime runs: llama-server, llama-perplexity, llama-bench,
llama-batched-bench.

    python -m edgemed.benchmarks.anchors build     # download the sdist, build once, print the binaries
    python -m edgemed.benchmarks.anchors paths     # print the binaries of an existing build (JSON)

The source is the sdist of the *installed* llama-cpp-python (``pip download --no-binary llama-cpp-python``,
kept in ``$EDGEMED_CACHE_DIR/anchors/``), so its ``vendor/llama.cpp`` is the commit the Python
bindings were built from: the same kernels on both sides of a comparison. The build uses the
flags llama-cpp-python's own build gets by default on this host (``GGML_NATIVE=ON``:
``-march=native``; OpenMP on; Release), because that is how the runtime's libraries were made
(their system info lists this CPU's own extensions and OPENMP); the side-by-side benchmarks check
the build's CPU features against the runtime's (``same_cpu_features``): llama-server logs them only
at trace verbosity, so they come from the same build's llama-perplexity
(``serve_bench_client.probe_cpu_features``).
Static libraries, so the binaries never load the venv's ``libllama.so`` by accident. No web UI
(no npm, no download). Idempotent: a finished build leaves ``build.json`` (version, sdist
sha256, flags, system info); a second ``build`` with the same version and flags only prints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from edgemed.errors import EdgemedError, InputError

PACKAGE = "llama-cpp-python"
TARGETS = ("llama-server", "llama-perplexity", "llama-bench", "llama-batched-bench")
#: cmake options: llama-cpp-python's defaults on a native build, plus what a headless, offline anchor needs
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # what the runtime build used: its system info lists this CPU's own extensions
    "-DGGML_OPENMP=ON",  # llama-cpp-python's build reports OPENMP = 1
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


class AnchorError(EdgemedError):
    """The C++ anchors could not be obtained or built."""


def installed_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise InputError(f"{PACKAGE} is not installed, so there is no runtime build to match.",
                         "pip install 'edgemed[gguf]' first") from None


def root(version: str) -> Path:
    from edgemed import env

    return env.cache_dir("anchors") / f"{PACKAGE}-{version}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(version: str, into: Path) -> Path:
    """The sdist of ``version`` in ``into`` (downloaded with pip unless already there)."""
    found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        # --no-binary for this package only: the sdist, while its build backend (needed for the metadata) may be a wheel
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
               f"{PACKAGE}=={version}", "-d", str(into)]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
        if proc.returncode != 0 or not found:
            raise AnchorError(f"pip could not download the {PACKAGE} {version} sdist: {proc.stderr.strip()[-400:]}",
                              "check the package index (pip config list), or put the .tar.gz in " + str(into))
    return found[0]


def unpack(sdist: Path, into: Path) -> Path:
    """``vendor/llama.cpp`` of the sdist, unpacked once under ``into``."""
    src = into / "src"
    top = src / sdist.name[:-len(".tar.gz")]
    if not (top / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        tmp = into / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        tmp.rename(src)
    return top / "vendor" / "llama.cpp"


def runtime_system_info() -> str:
    from edgemed.runtime.llamacpp import build

    return build().system_info.strip()


def build(*, jobs: int = 2, force: bool = False) -> dict:
    """Build the anchors for the installed llama-cpp-python (or find the finished build); returns build.json's content."""
    version = installed_version()
    home = root(version)
    stamp = home / "build.json"
    if stamp.exists() and not force:
        info = json.loads(stamp.read_text())
        if (info.get("flags") == list(CMAKE_FLAGS) and set(info["binaries"]) == set(TARGETS)
                and all(Path(p).exists() for p in info["binaries"].values())):
            return info
    if shutil.which("cmake") is None:
        raise AnchorError("cmake is not on PATH.", "install cmake >= 3.21 (apt-get install cmake, or pip install cmake)")
    sdist = fetch_sdist(version, home)
    src = unpack(sdist, home)
    out = home / "build"
    if force:  # a cached configure keeps its first compiler: a rebuild (CC/CXX changed) starts from a clean folder
        shutil.rmtree(out, ignore_errors=True)
    steps = (["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS],
             ["cmake", "--build", str(out), "-j", str(jobs), "--target", *TARGETS])
    for cmd in steps:
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (home / "build.log").open("a").write(proc.stdout)
        if proc.returncode != 0:
            raise AnchorError(f"'{cmd[0]} {cmd[1]}' failed (exit {proc.returncode}): {proc.stdout.strip()[-600:]}",
                              f"read {home / 'build.log'}; a C++17 compiler (gcc >= 9) and cmake >= 3.21 are needed")
    binaries = {t: str(out / "bin" / t) for t in TARGETS}
    missing = [t for t, p in binaries.items() if not Path(p).exists()]
    if missing:
        raise AnchorError(f"the build finished without {', '.join(missing)}.", f"read {home / 'build.log'}")
    info = {"package": PACKAGE, "version": version, "sdist": str(sdist), "sdist_sha256": _sha256(sdist),
            "llama_cpp_source": str(src), "flags": list(CMAKE_FLAGS), "binaries": binaries, "compiler": compiler(out),
            "runtime_system_info": runtime_system_info()}
    from edgemed.files.atomic import write_text

    write_text(stamp, json.dumps(info, indent=2) + "\n", force=True)
    return info


def compiler(build_dir: Path) -> str | None:
    """The C++ compiler a CMake build folder was configured with, as its ``--version`` names it (``CC``/``CXX`` in
    the environment choose it on a first configure): a side-by-side is like for like only with the runtime's
    (``runtime.native_build.compilers``). None where the folder does not say."""
    try:
        cache = (build_dir / "CMakeCache.txt").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in cache.splitlines():
        if line.startswith("CMAKE_CXX_COMPILER:"):
            exe = line.partition("=")[2].strip()
            try:
                out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
            except (OSError, subprocess.TimeoutExpired):
                return exe
            return (out.strip().splitlines() or [exe])[0]
    return None


def built_with() -> str | None:
    """The compiler of the built anchors for the installed llama-cpp-python (None where not built or not known)."""
    stamp = root(installed_version()) / "build.json"
    if not stamp.exists():
        return None
    info = json.loads(stamp.read_text())
    if info.get("compiler"):  # what the build recorded when it ran
        return info["compiler"]
    binaries = list((info.get("binaries") or {}).values())
    return compiler(Path(binaries[0]).parent.parent) if binaries else None


def same_cpu_features(anchor_line: str) -> bool:
    """Whether an anchor build's system info line lists the runtime's CPU features."""
    from edgemed.runtime.buffers import Build
    from edgemed.runtime.llamacpp import build as runtime_build

    return Build(anchor_line).features == runtime_build().features


def binaries() -> dict[str, Path]:
    """The built anchors for the installed llama-cpp-python, or an error that says how to build them."""
    stamp = root(installed_version()) / "build.json"
    if not stamp.exists():
        raise AnchorError("llama.cpp's llama-server (the anchor) has not been built for this llama-cpp-python.",
                          "run `python -m edgemed.benchmarks.anchors build` (about 10-20 minutes on 2 cores)")
    return {k: Path(v) for k, v in json.loads(stamp.read_text())["binaries"].items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("build", "paths"))
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs")
    ap.add_argument("--force", action="store_true", help="rebuild from a clean build folder even when a finished build "
                    "is there (CC/CXX in the environment choose the compiler: build with the runtime's)")
    args = ap.parse_args(argv)
    try:
        if args.command == "build":
            info = build(jobs=args.jobs, force=args.force)
            for name, path in info["binaries"].items():
                print(f"{name}: {path}")
            print(f"llama.cpp from {info['sdist']} (sha256 {info['sdist_sha256'][:16]}...)")
            print(f"runtime system info: {info['runtime_system_info']}")
        else:
            print(json.dumps({k: str(v) for k, v in binaries().items()}, indent=2))
    except EdgemedError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
