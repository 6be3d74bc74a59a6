"""The HTTP server's connection protocol: uvicorn's httptools protocol with a deadline on request heads.

uvicorn bounds an idle keep-alive connection but not a slow request head: a client that sends a
header byte every few seconds holds its connection for as long as it likes (slowloris). Here
every request head (request line and headers) must arrive within a deadline of the connection
opening or of the previous response; a client that misses it gets a 408 and the connection is
closed. The body has its own deadline (app/routes/uploads.py, WARMTUNE_BODY_TIMEOUT_S).

httptools (llhttp, in C) rather than h11 (pure Python): it parses a request for a fraction of
the CPU (bench/predict.py measures the request path).
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"


class HeadDeadlineProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.await_head()

    def on_headers_complete(self) -> None:
        self.cancel_head_deadline()  # a whole head arrived: the body deadline takes over
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        head_waiting = bool(self.pipeline)  # a pipelined request whose head already arrived
        super().on_response_complete()
        if not self.transport.is_closing() and not head_waiting:
            self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_head_deadline()
        super().connection_lost(exc)

    def await_head(self) -> None:
        self.cancel_head_deadline()
        self.head_deadline = self.loop.call_later(self.head_timeout_s, self.head_too_slow)

    def cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_too_slow(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing():
            return
        message = f"the request line and headers did not arrive within {self.head_timeout_s:g} s".encode()
        self.transport.write(TIMEOUT_ANSWER % (len(message), message))
        self.transport.close()


def http_protocol(head_timeout_s: float) -> partial[HeadDeadlineProtocol]:
    """What uvicorn's `http` option takes: the protocol with its head deadline."""
    return partial(HeadDeadlineProtocol, head_timeout_s=head_timeout_s)
