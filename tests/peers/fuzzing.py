"""Random requests against a real sidecar in front of a real upstream (FastMCP, or the
TypeScript SDK's server-everything on Express), and the invariants they must never break
(SPEC 2.1, 2.5 "No side doors", 2.6).

Shared by ``tests/test_fuzz.py`` (about a thousand cases in the suite) and ``bench/fuzz.py``
(as many as you like). A case is drawn by hypothesis as a *description*: which session it
names (one of this identity's live ids, another identity's, a closed one, an unknown or a
malformed one), how (headers, repeated headers, legacy query parameters), on which path
spelling, with which method and body. `FuzzTarget.send` resolves it against the pool of
real sessions and sends it with a raw httpx client, so the sidecar sees exactly those bytes.

The verdict never trusts the sidecar's own account. The upstream's request log says what
reached it; from it alone `FuzzTarget` knows which sessions the upstream issued, for whom
(the ``Authorization`` of the initialize), and which it has answered a DELETE for:

- I1: every session the upstream holds live is tracked live by the sidecar (admin API).
- I2: no request naming a closed, unknown or foreign-identity session reached the upstream.

Per case: the sidecar itself never answers 500 (a 500 relayed from FastMCP is FastMCP's; the
sidecar's own carries "Internal error in mcp-sidecar"), and the status is one of `STATUSES`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.peers.mcp_clients import ACCEPT_BOTH, PROTOCOL_VERSION, initialize_message
from tests.peers.node_peers import LoggedEverything, start_logged_everything
from tests.peers.processes import SidecarHandle, UpstreamHandle, start_sidecar, start_upstream

SIDECAR_500 = "Internal error in mcp-sidecar"
ALICE = "Bearer fuzz-alice"
BOB = "Bearer fuzz-bob"
IDENTITIES: tuple[str | None, ...] = (ALICE, BOB, None)  # None: identified by address
POOL_LIVE = 3  # live sessions kept per identity
POOL_CLOSED = 4
REFS = ("none", "own_live", "foreign_live", "closed", "unknown", "malformed")
# Every status the sidecar (or FastMCP behind it) may answer a fuzz case with: success, the
# redirects Starlette answers for a trailing slash (never followed here), client errors.
# 500 is allowed only when it is FastMCP's (checked separately); 502/503/504 would mean the
# upstream is in trouble, which a fuzz run must not cause, so they are not here.
STATUSES = frozenset({200, 202, 204, 307, 308, 400, 404, 405, 406, 409, 413, 415, 422, 431, 500})
HTTP_TIMEOUT = httpx.Timeout(10.0)
STREAM_READ_LIMIT = 64 * 1024

PATHS = (
    *(["/mcp"] * 12),  # the endpoint itself as often as all other spellings together
    "/MCP",
    "/Mcp",
    "/mcp/",
    "//mcp",
    "/mcp//",
    "/%6Dcp",
    "/%6dcp",
    "/m%63p",
    "/mcp%2F",
    "/mcp/sub",
    "/mcp/sub/deeper",
    "/mcp;x=1",
    "/",
    "/other",
    "/messages/",
    "/sse",
    "/MESSAGES/",
)
METHODS = ("POST", "POST", "POST", "GET", "GET", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD")
SESSION_HEADER_NAMES = ("Mcp-Session-Id", "mcp-session-id", "MCP-SESSION-ID")
QUERY_NAMES = ("sessionId", "session_id", "SessionId", "session_ID")
RPC_METHODS = (
    "ping",
    "tools/list",
    "tools/call",
    "initialize",
    "notifications/initialized",
    "resources/list",
    "prompts/list",
    "no/such/method",
)


# ---- what a case says ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request, described; `FuzzTarget.resolve` turns it into bytes on the wire."""

    method: str
    path: str
    identity: str | None
    header_refs: tuple[tuple[str, str], ...]  # (header name, session ref)
    query: tuple[tuple[str, str], ...]  # (name, session ref or "=literal")
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | None
    body_kind: str

    @property
    def kind(self) -> str:
        """The label a run counts by: what session the case names, and how."""
        refs = [ref for _, ref in self.header_refs] + [
            ref for _, ref in self.query if not ref.startswith("=")
        ]
        if not refs:
            return "no-session"
        if len(refs) > 1:
            return "repeated:" + "+".join(sorted(set(refs)))
        how = "header" if self.header_refs else "query"
        return f"{how}:{refs[0]}"


def _request_id() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(-(2**63), 2**63),
        st.just(1.0),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )


@st.composite
def _rpc_message(draw: st.DrawFn) -> dict[str, Any]:
    method = draw(st.sampled_from(RPC_METHODS))
    message: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0"] * 6 + ["1.0", 2]))}
    message["method"] = method
    if not method.startswith("notifications/") and draw(st.integers(0, 9)):
        message["id"] = draw(_request_id())
    if method == "initialize":
        message["params"] = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "fuzz", "version": "1.0"},
        }
    elif method == "tools/call":
        message["params"] = {"name": "echo", "arguments": {"text": draw(st.text(max_size=30))}}
    elif draw(st.booleans()):
        message["params"] = draw(st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
    return message


@st.composite
def _body(draw: st.DrawFn) -> tuple[bytes | None, str]:  # noqa: PLR0911 - a return per kind
    kind = draw(
        st.sampled_from(
            ["none", "rpc", "rpc", "rpc", "batch", "bom", "spaces", "garbage", "deep", "empty"]
        )
    )
    if kind == "none":
        return None, kind
    if kind == "empty":
        return b"", kind
    if kind == "garbage":
        return draw(st.binary(max_size=200)), kind
    if kind == "deep":
        depth = draw(st.integers(1, 20_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode(), kind
    if kind == "batch":
        return json.dumps(draw(st.lists(_rpc_message(), max_size=3))).encode(), kind
    text = json.dumps(draw(_rpc_message()))
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode(), kind
    if kind == "spaces":
        return (" \r\n\t" + text + "\n  ").encode(), kind
    return text.encode(), kind


@st.composite
def _extra_headers(draw: st.DrawFn) -> tuple[tuple[bytes, bytes], ...]:
    headers: list[tuple[bytes, bytes]] = []
    accept = draw(
        st.sampled_from([ACCEPT_BOTH] * 4 + ["application/json", "text/event-stream", "*/*", None])
    )
    if accept is not None:
        headers.append((b"Accept", accept.encode()))
    content_type = draw(
        st.sampled_from(
            ["application/json"] * 4 + ["application/json; charset=utf-8", "text/plain", None]
        )
    )
    if content_type is not None:
        headers.append((b"Content-Type", content_type.encode()))
    version = draw(st.sampled_from([PROTOCOL_VERSION, "2025-03-26", "1999-01-01", None]))
    if version is not None:
        headers.append((b"MCP-Protocol-Version", version.encode()))
    for _ in range(draw(st.integers(0, 2))):
        which = draw(st.sampled_from(["big", "utf8", "latin1", "last-event-id"]))
        if which == "big":
            headers.append((b"X-Fuzz-Big", b"a" * draw(st.integers(1, 6 * 1024 - 16))))
        elif which == "utf8":
            text = draw(st.text(_PRINTABLE, min_size=1, max_size=40))
            headers.append((b"X-Fuzz-Text", f"<{text}>".encode()))
        elif which == "latin1":
            headers.append((b"X-Fuzz-Latin", bytes(range(0xA0, 0xB0))))
        else:
            headers.append((b"Last-Event-ID", draw(st.sampled_from([b"1", b"999", b"x"]))))
    return tuple(headers)


_REF = st.sampled_from(REFS[1:])
# Header values httpx can send: no control characters (h11 refuses them before the wire).
_PRINTABLE = st.characters(min_codepoint=0x20, blacklist_categories=("Cc", "Cs"))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A random request against the sidecar, described (see `Case`)."""
    header_refs = draw(st.lists(st.tuples(st.sampled_from(SESSION_HEADER_NAMES), _REF), max_size=3))
    if draw(st.integers(0, 3)):  # mostly at most one session header
        header_refs = header_refs[:1]
    query = draw(
        st.lists(
            st.tuples(
                st.sampled_from(QUERY_NAMES),
                st.one_of(_REF, st.just("=x"), st.text(max_size=8).map(lambda t: "=" + t)),
            ),
            max_size=2,
        )
        if not draw(st.integers(0, 3))
        else st.just([])
    )
    body, body_kind = draw(_body())
    return Case(
        method=draw(st.sampled_from(METHODS)),
        path=draw(st.sampled_from(PATHS)),
        identity=draw(st.sampled_from(IDENTITIES)),
        header_refs=tuple(header_refs),
        query=tuple(query),
        headers=draw(_extra_headers()),
        body=body,
        body_kind=body_kind,
    )


# ---- the target: one sidecar, one upstream, a pool of real sessions -----------------------


@dataclass
class Outcome:
    status: int
    sidecar_500: bool
    body: bytes


@dataclass
class UpstreamView:
    """What the upstream's own request log says, read incrementally (it only grows)."""

    log_path: Path
    offset: int = 0
    owner: dict[str, str | None] = field(default_factory=dict)  # issued id -> Authorization
    deleted: set[str] = field(default_factory=set)  # ids the upstream answered a DELETE for
    all: list[dict[str, Any]] = field(default_factory=list)

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]

    @property
    def live(self) -> set[str]:
        return set(self.owner) - self.deleted


FASTMCP_LEGACY_PATHS = ("/messages", "/sse")


def acted_on(
    record: dict[str, Any], legacy_paths: tuple[str, ...] = FASTMCP_LEGACY_PATHS
) -> str | None:
    """The session a request reaching the upstream named, as the upstream reads it: the
    header on any path; a `session_id` query parameter only on its legacy endpoints (FastMCP:
    `/messages/`, `/sse`; server-everything in Streamable HTTP mode has none), the Streamable
    HTTP endpoint never looks at the query."""
    if record.get("header_session_id"):
        return str(record["header_session_id"])
    path = record["path"].lower()
    if legacy_paths and path.startswith(legacy_paths):
        return record["session_id"]
    return None


class InvariantError(AssertionError):
    pass


class FuzzTarget:
    """Sends cases to one sidecar and checks every answer and the upstream's log after it."""

    def __init__(
        self,
        *,
        base: str,
        admin_url: str,
        upstream_log: Path,
        legacy_paths: tuple[str, ...] = FASTMCP_LEGACY_PATHS,
    ) -> None:
        self.base = base
        self.legacy_paths = legacy_paths
        self.admin_url = admin_url
        self.http = httpx.Client(timeout=HTTP_TIMEOUT)
        self.view = UpstreamView(upstream_log)
        self.live: dict[str | None, list[str]] = {identity: [] for identity in IDENTITIES}
        self.closed: list[str] = []
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.by_body: Counter[str] = Counter()
        self.sent = 0
        self.failure: AssertionError | None = None
        self.violations: list[str] = []
        self.reported: set[str] = set()  # I1 ids already reported (keep_going)

    def close(self) -> None:
        self.http.close()

    # -- the pool --

    def _initialize(self, identity: str | None) -> str:
        headers = {"Accept": ACCEPT_BOTH, "Content-Type": "application/json"}
        if identity is not None:
            headers["Authorization"] = identity
        message = initialize_message("fuzz-pool")
        answer = self.http.post(self.base + "/mcp", json=message, headers=headers)
        assert answer.status_code == 200, answer.text
        session_id = answer.headers["mcp-session-id"]
        headers |= {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROTOCOL_VERSION}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert self.http.post(self.base + "/mcp", json=note, headers=headers).status_code == 202
        return session_id

    def fill_pool(self) -> None:
        """Keep POOL_LIVE live sessions per identity and POOL_CLOSED closed ones."""
        for identity in IDENTITIES:
            while len(self.live[identity]) < POOL_LIVE:
                self.live[identity].append(self._initialize(identity))
        while len(self.closed) < POOL_CLOSED:
            session_id = self._initialize(ALICE)
            headers = {"Authorization": ALICE, "Mcp-Session-Id": session_id}
            answer = self.http.delete(self.base + "/mcp", headers=headers)
            assert answer.status_code in (200, 202, 204), answer.text
            self.closed.append(session_id)
        self._absorb_log()

    def _absorb_log(self) -> list[dict[str, Any]]:
        records = self.view.read_new()
        for record in records:
            issued = record.get("response_session_id")
            if issued and 200 <= record["status"] < 300 and issued not in self.view.owner:
                self.view.owner[issued] = record.get("authorization")
            if record["method"] == "DELETE" and 200 <= record["status"] < 300:
                self.view.deleted.add(acted_on(record, self.legacy_paths) or "")
        self.view.all.extend(records)
        for ids in self.live.values():
            gone = [i for i in ids if i in self.view.deleted]
            for session_id in gone:
                ids.remove(session_id)
                self.closed.append(session_id)
        return records

    def _session_for(self, ref: str, identity: str | None, salt: int) -> str:
        if ref == "own_live":
            ids = self.live[identity]
        elif ref == "foreign_live":
            ids = [i for other in IDENTITIES if other != identity for i in self.live[other]]
        elif ref == "closed":
            ids = self.closed
        elif ref == "unknown":
            return secrets.token_hex(16)
        else:  # malformed
            return ["", "x" * 300, "ü-ß", "a b", "../mcp", "%00", "1,2", "\u00ff"][salt % 8]
        return ids[salt % len(ids)]

    # -- one case --

    def resolve(self, case: Case) -> tuple[str, list[tuple[bytes, bytes]], dict[str, str | None]]:
        """URL, headers, and the refs they name (id -> ref) for the verdict."""
        named: dict[str, str | None] = {}
        headers: list[tuple[bytes, bytes]] = list(case.headers)
        if case.identity is not None:
            headers.append((b"Authorization", case.identity.encode()))
        for salt, (name, ref) in enumerate(case.header_refs):
            session_id = self._session_for(ref, case.identity, salt + self.sent)
            named[session_id] = ref
            headers.append((name.encode(), session_id.encode()))
        query: list[tuple[str, str]] = []
        for salt, (name, ref) in enumerate(case.query):
            if ref.startswith("="):
                query.append((name, ref[1:]))
                continue
            session_id = self._session_for(ref, case.identity, salt + self.sent)
            named[session_id] = ref
            query.append((name, session_id))
        url = self.base + case.path
        if query:
            url += "?" + urlencode(query, quote_via=quote)
        return url, headers, named

    def send(self, case: Case) -> Outcome:
        url, headers, _ = self.resolve(case)
        self.sent += 1
        request = self.http.build_request(case.method, url, headers=headers, content=case.body)
        # httpx adds Content-Length/Host; a GET stream is held open by the upstream, so only
        # the first bytes of any body are read.
        response = self.http.send(request, stream=True)
        try:
            body = b""
            if case.method != "HEAD" and not (
                case.method == "GET"
                and response.headers.get("content-type", "").startswith("text/event-stream")
            ):
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > STREAM_READ_LIMIT:
                        break
        finally:
            response.close()
        outcome = Outcome(
            response.status_code,
            response.status_code == 500 and SIDECAR_500.encode() in body,
            body,
        )
        self.by_kind[case.kind] += 1
        self.by_status[outcome.status] += 1
        self.by_body[case.body_kind] += 1
        return outcome

    def check_case(self, case: Case, outcome: Outcome) -> None:
        """Per case: no sidecar 500, a known status, and I2 on what this case let through."""
        assert not outcome.sidecar_500, (case, outcome)
        assert outcome.status in STATUSES, (case, outcome.status, outcome.body[:300])
        problems = self.side_doors(self._absorb_log())
        if problems:
            raise InvariantError(f"I2 broken by {case!r}: {problems}")
        self.fill_pool()

    def side_doors(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """I2: records naming an id the upstream never issued (to a 2xx), another identity's
        id, or one it had already answered a DELETE for before this request."""
        bad = []
        closed_before: set[str] = set(self.view.deleted)
        # `deleted` already holds this batch's DELETEs; a request before its own session's
        # DELETE within the same batch is fine, so replay the batch in order.
        for record in reversed(records):
            if record["method"] == "DELETE" and 200 <= record["status"] < 300:
                closed_before.discard(acted_on(record, self.legacy_paths) or "")
        for record in records:
            session_id = acted_on(record, self.legacy_paths)
            if session_id is None:
                continue
            if session_id not in self.view.owner:
                bad.append(record | {"why": "unknown"})
            elif self.view.owner[session_id] != record.get("authorization"):
                bad.append(record | {"why": "foreign"})
            elif session_id in closed_before:
                bad.append(record | {"why": "closed"})
            if record["method"] == "DELETE" and 200 <= record["status"] < 300:
                closed_before.add(session_id)
        return bad

    # -- the whole run --

    def tracked_live(self) -> set[str]:
        tracked: set[str] = set()
        offset = 0
        while True:
            answer = self.http.get(
                self.admin_url + "/sessions",
                params={"state": "live", "limit": 1000, "offset": offset},
            )
            assert answer.status_code == 200, answer.text
            page = answer.json()
            tracked |= {s["id"] for s in page["sessions"]}
            offset += len(page["sessions"])
            if not page["sessions"] or offset >= page["total"]:
                return tracked

    def untracked(self) -> set[str]:
        """I1's counterexamples: live upstream (per its log), not tracked live by the sidecar."""
        self._absorb_log()
        return self.view.live - self.tracked_live()

    def check_untracked(self, within: float = 5.0) -> None:
        """I1, allowing the sidecar `within` s to finish closing what it has refused (the
        upstream's DELETE answer is the event waited for, polled with a deadline)."""
        deadline = time.monotonic() + within
        while missing := self.untracked() - self.reported:
            self._drop_from_pool(missing)
            if time.monotonic() > deadline:
                owners = {m: self.view.owner[m] for m in missing}
                self.reported |= missing
                history = {m: self.history(m) for m in sorted(missing)}
                raise InvariantError(
                    f"I1: upstream holds {owners}, not tracked live; upstream log: {history}"
                )
            time.sleep(0.05)

    def _drop_from_pool(self, session_ids: set[str]) -> None:
        # Sessions the sidecar no longer tracks answer 404 from now on: out of the live pool,
        # so "own_live" keeps meaning a session the sidecar serves.
        for ids in self.live.values():
            ids[:] = [i for i in ids if i not in session_ids]

    def held_untracked(self, session_id: str, within: float = 5.0) -> bool:
        """I1 for one session: still live upstream and not tracked live after `within` s."""
        deadline = time.monotonic() + within
        while session_id in self.untracked():
            if time.monotonic() > deadline:
                return True
            time.sleep(0.05)
        return False

    def history(self, session_id: str) -> list[str]:
        """What the upstream's log says happened to a session (for a failure message)."""
        return [
            f"{r['method']} {r['path']} -> {r['status']}"
            for r in self.view.all
            if session_id in (r.get("header_session_id"), r.get("response_session_id"))
        ]

    def report(self) -> str:
        lines = [f"cases: {self.sent}", "by kind:"]
        lines += [f"  {k:40} {n}" for k, n in sorted(self.by_kind.items())]
        lines.append("by body:")
        lines += [f"  {k:40} {n}" for k, n in sorted(self.by_body.items())]
        lines.append("by status:")
        lines += [f"  {k:<40} {n}" for k, n in sorted(self.by_status.items())]
        lines.append(
            f"upstream sessions issued: {len(self.view.owner)}, live: {len(self.view.live)}"
        )
        return "\n".join(lines)


def run_cases(
    target: FuzzTarget, count: int, *, check_every: int = 100, keep_going: bool = False
) -> None:
    """Send `count` hypothesis-drawn cases (derandomized: the same ones every run), checking
    each, and I1 every `check_every` cases and at the end.

    A failure raises the first violation as it happened (hypothesis would otherwise replay
    the case against a server whose state has moved on and call it flaky). `keep_going`
    records every violation in `target.violations` instead (for the bench)."""

    def check(action: Callable[[], None]) -> None:
        try:
            action()
        except AssertionError as exc:
            if not keep_going:
                target.failure = target.failure or exc
                raise
            target.violations.append(str(exc))

    @settings(
        max_examples=count,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],  # the server's state moves on: a shrink would not replay
        suppress_health_check=list(HealthCheck),
    )
    @given(cases())
    def one(case: Case) -> None:
        outcome = target.send(case)
        check(lambda: target.check_case(case, outcome))
        if target.sent % check_every == 0:
            check(target.check_untracked)

    target.fill_pool()
    try:
        one()
    except Exception:
        if target.failure is not None:
            raise target.failure from None
        raise
    check(target.check_untracked)


# ---- the stacks a run fuzzes: a sidecar in front of one real upstream ---------------------

UPSTREAMS = ("fastmcp", "everything")


@dataclass
class FuzzStack:
    """One upstream (with its request log) and one sidecar in front of it."""

    upstream_kind: str
    upstream: UpstreamHandle | LoggedEverything
    sidecar: SidecarHandle

    def target(self) -> FuzzTarget:
        # server-everything's Streamable HTTP app reads the session from the header alone.
        legacy = FASTMCP_LEGACY_PATHS if self.upstream_kind == "fastmcp" else ()
        return FuzzTarget(
            base=self.sidecar.base,
            admin_url=self.sidecar.admin_url,
            upstream_log=self.upstream.request_log,
            legacy_paths=legacy,
        )

    def stop(self) -> None:
        try:
            self.sidecar.stop()
        finally:
            self.upstream.stop()


def start_stack(tmp_path: Path, upstream_kind: str) -> FuzzStack:
    """FastMCP (stateful Streamable HTTP) or server-everything, and a sidecar, on 127.0.0.1."""
    upstream: UpstreamHandle | LoggedEverything
    if upstream_kind == "fastmcp":
        upstream = start_upstream(tmp_path, "streamable-http")
    elif upstream_kind == "everything":
        upstream = start_logged_everything(tmp_path)
    else:
        raise ValueError(f"upstream must be one of {UPSTREAMS}, not {upstream_kind!r}")
    try:
        sidecar = start_sidecar(tmp_path, upstream.url, log={"level": "info"})
    except BaseException:
        upstream.stop()
        raise
    return FuzzStack(upstream_kind, upstream, sidecar)
