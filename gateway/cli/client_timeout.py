"""uvicorn's HTTP protocols with a deadline on the client: a request's headers and body must arrive
within `LETHE_CLIENT_TIMEOUT_SECONDS` of the connection opening or of the previous answer.

uvicorn closes a keep-alive connection that stays idle after an answer (`timeout_keep_alive`), but
has no timeout while it waits for a request: a client that connects and sends nothing, or sends its
headers a byte a second (slowloris), or its body that slowly, holds a connection for as long as it
likes. Here a timer is armed when a connection opens and after every answer; when it fires, the
connection is closed unless a request has been read whole and is being answered (generation may
take as long as it takes; only the client's sending is timed).
"""

from __future__ import annotations

import asyncio
from typing import Any


class _ClientDeadline:
    """Mixed into a uvicorn HTTP protocol (both keep `transport`, `cycle` and `loop`, and call
    `on_response_complete` after every answer)."""

    client_timeout: float = 60.0
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.client_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        cycle = self.cycle
        being_answered = cycle is not None and not cycle.response_complete and not cycle.more_body
        if not being_answered and not self.transport.is_closing():
            self.transport.close()


def protocol_with_deadline(seconds: float) -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn would pick (httptools when installed, else h11), with the client
    deadline of `seconds`."""
    base: type[asyncio.Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # httptools is not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type(f"{base.__name__}WithClientDeadline", (_ClientDeadline, base), {"client_timeout": seconds})
