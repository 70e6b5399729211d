"""What a route reads: the app's ``Served`` (on ``app.state.served``) and the request's ``RequestRecord``.

``create_app`` builds one ``Served`` per app; ``Observe`` (``middleware.py``) gives every request its
``RequestRecord``. Routes and the generation path take both from the request, so none of them closes over
an app.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from starlette.requests import Request

from edgemed.files.hashing import stamp
from edgemed.serve.config import ServeConfig
from edgemed.serve.metrics import Metrics
from edgemed.serve.middleware import RequestRecord, record_of


@dataclass(frozen=True)
class Served:
    """One app's model server: the running batcher, its config, metrics and the prompt templates."""

    batcher: object  # batcher.Batcher, started; the caller closes it after the server stops
    config: ServeConfig
    metrics: Metrics
    templates: dict = field(default_factory=dict)  # template name -> templates.Template
    created: int = 0  # when the app was made (/v1/models' "created")
    #: set when the server ends the answers still running at a stop (``cli.serve``): a stream cut from then on is
    #: the server's doing (503 ``unavailable``), not a client that left
    stopping: threading.Event = field(default_factory=threading.Event)
    #: which file the base model was loaded from (``base_identity`` of the batcher's ``model_path`` at start; None:
    #: not known): an adapter added later is checked against the file there only while it is still that one
    base: tuple | None = None


def base_identity(path) -> tuple | None:
    """Which file ``path`` is now: its device, inode, size and mtime (``files.hashing.stamp`` less the ctime, which a
    hard link or a rename there and back changes, not the file). Another file put there, or this one rewritten, gives
    another identity; None: no path, or no file there."""
    if path is None:
        return None
    try:
        return stamp(os.stat(path))[:4]
    except OSError:
        return None


def served(request: Request) -> Served:
    return request.app.state.served


def request_record(request: Request) -> RequestRecord:
    return record_of(request.scope)
