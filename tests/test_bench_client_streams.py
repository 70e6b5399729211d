"""The benchmarks' SSE client and percentile: a failed request is an error, never a measured row."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgemed.benchmarks.serve_bench_client import stream_request
from edgemed.benchmarks.serve_streams import percentile
from edgemed.errors import EdgemedError


class _Response:
    def __init__(self, lines: list[str], status: int = 200):
        self.lines, self.status_code = lines, status

    def iter_lines(self):
        yield from self.lines

    def read(self) -> bytes:
        return b"".join(line.encode() for line in self.lines)


class _Client:
    """Answers every POST with the given SSE lines (what each server writes: ``data: {...}`` then a blank line)."""

    def __init__(self, events: list):
        self.lines = [x for e in events for x in (f"data: {e if isinstance(e, str) else json.dumps(e)}", "")]

    @contextlib.contextmanager
    def stream(self, method, url, json=None, timeout=None):
        yield _Response(self.lines)


SERVER = SimpleNamespace(name="edgemed", url="http://127.0.0.1:1", log=Path("server.log"), model_id="m")


def _text(t: str, finish=None) -> dict:
    return {"choices": [{"index": 0, "text": t, "finish_reason": finish}]}


ERROR = {"error": {"message": "The server failed on this request", "type": "server_error", "code": "server_error"}}


def test_a_whole_stream_is_measured():
    row = stream_request(_Client([_text("a"), _text("b"), _text("", "length"),
                                  {"choices": [], "usage": {"completion_tokens": 2}}, "[DONE]"]), SERVER, "p", 2)
    assert (row["tokens"], row["finish"], len(row["times"])) == (2, "length", 2)
    assert row["ttft_s"] >= 0


@pytest.mark.parametrize("events", [
    [ERROR, "[DONE]"],                  # failed before any text (edgemed: a finish reason outside the API's)
    [_text("a"), _text("b"), ERROR],    # failed mid-answer, then the connection closed
    [_text("a"), _text("b")],           # cut off: no finish reason, no [DONE]
], ids=["error-then-done", "text-then-error", "cut-off"])
def test_a_request_that_failed_mid_stream_is_an_error_not_a_row(events):
    with pytest.raises(EdgemedError, match="edgemed"):
        stream_request(_Client(events), SERVER, "p", 8)


def test_percentile_refuses_a_nan_instead_of_answering_by_its_position():
    assert percentile([0.4, 0.5, 0.6], 50) == 0.5
    for values in ([math.nan, 0.4, 0.5, 0.6], [0.4, 0.5, math.nan, 0.6]):
        with pytest.raises(ValueError, match="NaN"):
            percentile(values, 50)


def test_with_no_repack_for_llama_server_edgemed_is_started_with_extra_buffers_none(tmp_path, monkeypatch):
    """--server-arg=--no-repack turns off all of llama-server's extra buffers: the edgemed arm must run the same
    kernels, through a copy of its profile with extra_buffers = "none" (read back by edgemed's profile reader)."""
    import shutil

    from edgemed.benchmarks.serve_bench_client import EdgemedServer, matched_extra_buffers
    from edgemed.devices.profiles import load_profiles

    assert matched_extra_buffers(()) is None
    mode = matched_extra_buffers(("--no-repack",))
    assert mode == "none"
    server = EdgemedServer(tmp_path / "m.gguf", 2, 2, 512, extra=("--profile", "generic"), extra_buffers=mode)
    try:
        cmd, env = server.command(), server.env()
        assert cmd.count("--profile") == 1
        name = cmd[cmd.index("--profile") + 1]
        assert name == "generic-extra-buffers-none"
        with monkeypatch.context() as m:
            m.setenv("EDGEMED_PROFILES_DIR", env["EDGEMED_PROFILES_DIR"])
            profile = load_profiles()[name]
        assert profile.llama["extra_buffers"] == "none"
        generic = {k: v for k, v in load_profiles()["generic"].llama.items() if k != "extra_buffers"}
        assert {k: v for k, v in profile.llama.items() if k != "extra_buffers"} == generic  # nothing else changed
        assert server.describe()["extra_buffers"] == "none"
        plain = EdgemedServer(tmp_path / "m.gguf", 2, 2, 512, extra=("--profile", "generic"))
        assert plain.env() is None and plain.command()[plain.command().index("--profile") + 1] == "generic"
        shutil.rmtree(plain.folder)
    finally:
        shutil.rmtree(server.folder)


def test_the_weight_buffers_are_read_back_from_a_llama_cpp_log():
    from edgemed.benchmarks.serve_bench_client import weight_buffers

    log = ("load_tensors:   CPU_Mapped model buffer size =   105.44 MiB\n"
           "load_tensors:   CPU_REPACK model buffer size =    84.38 MiB\nmain: server is listening\n")
    assert weight_buffers(log) == {"CPU_Mapped": 105.44, "CPU_REPACK": 84.38}
    assert weight_buffers("main: server is listening\n") is None
