"""`edgemed serve` says where llama.cpp put the weights, and the serving benchmarks read it back into their results.

Without it a side-by-side result could not show which kernels edgemed's arm ran (its profile's repack or AMX, or
none beside a llama-server given --no-repack): its weight buffers are logged by llama.cpp only at -vv.
"""

from __future__ import annotations

import shutil

from test_serve_prefix_cache_cli import _serve


def test_serve_prints_the_placement_llama_cpp_reported_and_the_bench_client_reads_it(smollm2_gguf, tmp_path):
    from edgemed.benchmarks.serve_bench_client import EdgemedServer

    lines = _serve(smollm2_gguf, tmp_path, "--profile", "generic")
    placed = [line for line in lines if line.startswith("placement: ")]
    assert len(placed) == 1 and "llama.cpp placed " in placed[0], "\n".join(lines)
    server = EdgemedServer(smollm2_gguf, 1, 1, 512)
    try:
        server.log.write_text("\n".join(lines) + "\n")
        described = server.describe()
        assert described["placement"] == placed[0].removeprefix("placement: ")
        buffers = described["weight_buffers_mib"]
        assert buffers and all(mib > 0 for mib in buffers.values()), described
        assert 60 < sum(buffers.values()) < 200, buffers  # the 98 MB Q4_1 file's weights, in whichever buffers
    finally:
        shutil.rmtree(server.folder)
