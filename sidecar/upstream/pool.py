"""The upstreams a sidecar fronts, as a pool: one member today, replicas later (SPEC 2.8).

Every session is bound to a member by name (`Binding.upstream`); requests of a session go to
its member, new sessions to the one `place()` picks. Names: "" for the single upstream of
`upstream.url` (and for sessions recorded before bindings existed), so a binding written by
one configuration is still understood by the next.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .client import Upstream


class UpstreamPool:
    def __init__(
        self,
        url: str,
        connect_timeout: float,
        read_timeout: float,
        static_headers: Mapping[str, str] | None = None,
    ) -> None:
        self._members: dict[str, Upstream] = {
            "": Upstream(url, connect_timeout, read_timeout, static_headers)
        }

    @property
    def primary(self) -> Upstream:
        """The member that answers what belongs to no session (metadata, sessionless calls)."""
        return next(iter(self._members.values()))

    def __iter__(self) -> Iterator[tuple[str, Upstream]]:
        return iter(self._members.items())

    def member(self, name: str) -> Upstream | None:
        """The member a binding names; None if it is no longer configured."""
        found = self._members.get(name)
        if found is None and name == "":
            return self.primary
        return found

    def place(self) -> str:
        """The member a new session goes to."""
        return next(iter(self._members))

    def configure(
        self, connect_timeout: float, read_timeout: float, static_headers: Mapping[str, str]
    ) -> None:
        """A reload: new timeouts and static headers for every member."""
        for member in self._members.values():
            member.connect_timeout = connect_timeout
            member.read_timeout = read_timeout
            member.static_headers = dict(static_headers)

    async def start(self) -> None:
        for member in self._members.values():
            await member.start()

    async def close(self) -> None:
        for member in self._members.values():
            await member.close()
