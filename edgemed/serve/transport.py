"""What ``edgemed serve`` holds each connection to, below HTTP's routes: how long a client may take to send its
request headers, and how many sockets the process may hold.

uvicorn closes a connection left idle between requests (``timeout_keep_alive``), but once a client has sent the
first bytes of a request it waits for the rest for ever. Anyone who can reach the port, with no key, could then
hold a socket per connection opened (``GET /health HTTP/1.1`` and no blank line) until the process runs out of
file descriptors, and every clinician's request fails. ``header_deadline`` closes a connection whose request
headers are not complete ``HEADER_TIMEOUT_S`` after it opened or after its last answer ended. The body of a
request has its own deadline, in ``middleware.Guard`` (408).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: Seconds a client has to send a whole request head (request line and headers): a browser or an SDK sends it in
#: one write, within milliseconds; only a client holding the socket open takes longer.
HEADER_TIMEOUT_S = 10.0


def header_deadline(base: type, seconds: float = HEADER_TIMEOUT_S) -> type:
    """A subclass of uvicorn's HTTP protocol class ``base`` (h11 or httptools: both make ``cycle`` when a request's
    headers are complete) that closes the connection when no request head is complete ``seconds`` after the
    connection opened, or after an answer ended, and no answer is being sent."""

    class HeaderDeadline(base):
        _deadline = None
        _armed_cycle = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            waiting = self.cycle is self._armed_cycle and (self.cycle is None or self.cycle.response_complete)
            if waiting and not self.transport.is_closing():
                log.info("connection from %s closed: no complete request head within %g s",
                         self.client[0] if self.client else "unknown", seconds)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._armed_cycle:
                self._disarm()  # a request head is complete: its body and answer have deadlines of their own

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit of open files to its hard limit (often 1,024 -> 524,288 under systemd), so
    that connections held open cost a client far more sockets before any request fails; (soft, hard) after, or
    None where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, hard
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:  # macOS caps it below an infinite hard limit (OPEN_MAX)
        log.debug("open files limit left at %d (%s)", soft, exc)
        return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)  # read back
