"""A real uvicorn server on 127.0.0.1 (free port) in a thread, for tests of ``edgemed serve``."""

from __future__ import annotations

import json
import threading
import time


class ServerThread:
    """``with ServerThread(app) as srv: srv.url`` — uvicorn serving ``app`` until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", **config):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on",
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(predicate, timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def batcher_kwargs(monkeypatch, args: list[str]):
    """What ``edgemed serve ARGS`` hands the batcher, stopped before anything loads: ``(kwargs, result)``."""
    from click.testing import CliRunner

    from edgemed.cli import cli
    from edgemed.errors import EdgemedError
    from edgemed.runtime.batch import batcher as batcher_module

    seen: dict = {}

    class Stop(EdgemedError):
        pass

    def fake(*_args, **kwargs):
        seen.update(kwargs)
        raise Stop("stopped before loading", "this is a test")

    monkeypatch.setattr(batcher_module, "Batcher", fake)
    return seen, CliRunner().invoke(cli, ["serve", *args])


def audit_lines(path) -> list[dict]:
    """The audit log's complete records, read while the server may be writing one: a last line without its newline
    is a record half in the page cache (a write that crosses a page shows its first part first), not yet a record."""
    text = path.read_text()
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def collect(stream) -> tuple:
    """``(text, Finished)`` of a batcher stream, checking its shape: pieces, then one ``Finished`` last."""
    from edgemed.runtime.batch.batcher import Finished, Piece

    items = list(stream)
    assert all(isinstance(i, Piece) for i in items[:-1]) and isinstance(items[-1], Finished)
    return "".join(i.text for i in items[:-1]), items[-1]
