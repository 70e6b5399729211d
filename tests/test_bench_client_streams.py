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
