"""The HTTP client for one upstream MCP server.

This is the one place aiohttp client errors become `UpstreamError`s (502/504 for the proxy,
retry-or-give-up for the closer). Two peer habits shape it:

* The SDK servers (uvicorn) close idle keep-alive connections after 5 s. A request written
  onto such a connection just as the server closes it fails, so a failure on a *reused*
  pooled connection is retried once on a fresh one (SPEC 2.1) -- but a POST only when the
  request provably never reached the upstream: aiohttp refused to write it at all.
  Once written, the server may have run the tool call before the connection dropped, and a
  retry would run it twice (nginx's `proxy_next_upstream` rule for non-idempotent methods);
  the client gets 502 and decides. Idempotent methods (GET, DELETE, ...) are retried once
  by aiohttp itself. Pooled connections are dropped after 3 s idle, below the servers' 5 s,
  so the race that leaves a written POST unanswered is rare. The rule reads the exception,
  not aiohttp's request tracing: tracing cost several percent of the CPU of every request.
* Bodies are relayed exactly as sent, so the client session never decompresses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .. import aiohttp_private
from ..errors import (
    UpstreamError,
    UpstreamRefusedError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from .idle import spoke_while_idle

log = logging.getLogger("sidecar.upstream")

POOL_IDLE_SECONDS = 3.0
SESSION_HEADER = "Mcp-Session-Id"
PROTOCOL_HEADER = "MCP-Protocol-Version"


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def may_retry(method: str, exc: BaseException) -> bool:
    """Only a request aiohttp refused to write at all, the pooled connection being already
    closing: nothing of it reached the upstream. Idempotent methods are left to aiohttp,
    which retries them once itself.

    aiohttp writes a bytes body together with the request head, in one write, so this refusal
    is the whole request or nothing. A failure after that write (the upstream closed the
    connection while or after reading it) is never retried: it may have run the call. If a
    later aiohttp words the refusal differently, this answers no, the safe side.
    """
    if method in IDEMPOTENT:
        return False
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionResetError) and _REFUSED in str(cause):
            return True
        cause = cause.__cause__
    return False


_REFUSED = "Cannot write to closing transport"


def _connector() -> aiohttp.TCPConnector:
    """The pool of kept-alive connections to one upstream: checked before each reuse as the
    fast path's are (`idle.py`), where the installed aiohttp lets this code do so."""
    if _unchecked_pool():
        return aiohttp.TCPConnector(limit=0, keepalive_timeout=POOL_IDLE_SECONDS)
    return aiohttp_private.CheckedConnector(
        spoke_while_idle, limit=0, keepalive_timeout=POOL_IDLE_SECONDS
    )


@functools.cache
def _unchecked_pool() -> bool:
    """Whether this aiohttp lacks what `CheckedConnector` needs; said once, in one line."""
    absent = aiohttp_private.missing_for_upstream()
    if absent:
        log.warning(
            "aiohttp %s lacks what the upstream pool's check before reuse uses (%s): a request "
            "may meet a connection the upstream just closed and get 502",
            aiohttp.__version__,
            ", ".join(absent),
        )
    return bool(absent)


class Upstream:
    """A pooled client bound to the upstream's origin."""

    def __init__(
        self,
        url: str,
        connect_timeout: float,
        read_timeout: float,
        static_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = URL(url)
        self.authority = self.url.raw_authority
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.static_headers = dict(static_headers or {})
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            connector=_connector(),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout),
            auto_decompress=False,
            # Headers pass as the client sent them: aiohttp would add `Accept: */*`, which
            # the SDK servers refuse, to a request that carried no Accept.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to the client, not to us
        )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    @property
    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise RuntimeError("upstream client used before start()")
        return self._client

    def target(self, path_qs: str) -> URL:
        """The upstream URL for a client's path and query (absolute URLs are not accepted)."""
        return self.url.with_path("/").join(URL(path_qs, encoded=True))

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str] | Mapping[str, str],
        body: bytes | None,
    ) -> aiohttp.ClientResponse:
        """Send one request and return the response once its headers arrived."""
        try:
            return await self._send(method, url, headers, body)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not may_retry(method, exc):
                raise _unreachable(url, exc) from exc
        # The pooled connection was closed under us before the request could count: one retry.
        try:
            return await self._send(method, url, headers, body)
        except aiohttp.ClientError as exc:
            raise _unreachable(url, exc) from exc

    async def _send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str] | Mapping[str, str],
        body: bytes | None,
    ) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout(self.read_timeout):
                return await self.client.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                )
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                # Path only: a legacy message URL's query holds the whole session id, which
                # must never reach a log line.
                f"{url.origin()}{url.path} did not answer within {self.read_timeout:g}s "
                "(upstream.read_timeout)"
            ) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            raise
        except aiohttp.ClientError as exc:
            raise _unreachable(url, exc) from exc

    async def probe(self, within: float) -> bool:
        """A health check (SPEC 2.8): does the MCP endpoint give any HTTP answer in time?

        HEAD: no SDK server opens a stream for it or counts it as a session's request, and
        any status (405 included) proves the server is there.
        """
        try:
            async with asyncio.timeout(within):
                response = await self.client.request(
                    "HEAD", self.url, headers=self.static_headers, allow_redirects=False
                )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False
        response.release()
        return True

    async def delete_session(
        self, session_id: str, protocol_version: str | None, credentials: Mapping[str, str]
    ) -> int:
        """Close a session upstream (SPEC 2.4); returns the HTTP status."""
        headers: dict[str, str] = {**self.static_headers, **credentials, SESSION_HEADER: session_id}
        if protocol_version:
            headers[PROTOCOL_HEADER] = protocol_version
        response = await self.request("DELETE", self.url, headers, None)
        async with response:
            await response.read()
            return response.status

    async def delete_raw(self, session_id: bytes, credentials: Mapping[str, str]) -> int:
        """Close a session whose id is not text aiohttp can write (`untrackable.py`): the
        request written by hand on a connection of its own, the id's bytes exactly as the
        upstream sent them (aiohttp would write the id as UTF-8, dropping a byte that is not,
        and refuses control characters). Returns the HTTP status."""
        if b"\r" in session_id or b"\n" in session_id:
            raise UpstreamError("the session id holds a line break; it cannot be sent back")
        url = self.url
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    url.raw_host, url.port, ssl=url.scheme == "https"
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachableError(f"cannot reach {url.origin()}: {exc!r}") from exc
        try:
            writer.write(self._delete_head(session_id, credentials))
            async with asyncio.timeout(self.read_timeout):
                status_line = await reader.readline()
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachableError(f"{url.origin()} did not answer: {exc!r}") from exc
        finally:
            writer.close()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise UpstreamError(f"{url.origin()} answered no HTTP status: {status_line[:80]!r}")
        return int(parts[1])

    def _delete_head(self, session_id: bytes, credentials: Mapping[str, str]) -> bytes:
        """`delete_session`'s request as bytes; other values as aiohttp decoded them."""
        head = [b"DELETE %s HTTP/1.1" % self.url.raw_path_qs.encode()]
        head.append(b"Host: " + self.authority.encode())
        for name, value in {**self.static_headers, **credentials}.items():
            head.append(name.encode() + b": " + value.encode("utf-8", "surrogateescape"))
        head += [SESSION_HEADER.encode() + b": " + session_id, b"Content-Length: 0"]
        return b"\r\n".join([*head, b"Connection: close", b"", b""])


def _unreachable(url: URL, exc: BaseException) -> UpstreamUnreachableError:
    # No connection at all (refused, no route, DNS): the request was never sent.
    never_sent = isinstance(exc, aiohttp.ClientConnectorError)
    kind = UpstreamRefusedError if never_sent else UpstreamUnreachableError
    return kind(
        f"cannot reach the upstream MCP server at {url.origin()} ({exc}); "
        "check that it is running and that upstream.url is right"
    )
