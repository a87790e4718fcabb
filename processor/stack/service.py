"""What the stack needs to know about one service: how to launch it and how to ask if it is up."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import httpx

from processor.stack.layout import ServiceName

Say = Callable[[str], None]
"""Reports one line of progress, plain text."""


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """A command ready to start: ``env`` is added to (and overrides) the caller's environment;
    ``unset_env`` names variables removed from it first."""

    command: Sequence[str]
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)
    unset_env: Sequence[str] = ()


class StackService(Protocol):
    """One service of the local stack."""

    @property
    def name(self) -> ServiceName: ...

    @property
    def ports(self) -> Mapping[str, int]:
        """Every port the service binds, by the StackSettings field that sets it."""
        ...

    @property
    def address(self) -> str:
        """What a client connects to: a bootstrap server or a base URL."""
        ...

    def prepare(self, say: Say) -> LaunchSpec:
        """Get everything in place for a start (may download or format); raise StackError."""
        ...

    def is_healthy(self) -> bool:
        """One quick check that the service answers real requests; never raises."""
        ...


class HttpHealthCheck:
    """GET a URL and expect 200. One client serves every probe (making one costs more than the
    request), and no connection is kept between probes, so each probe is a fresh one."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        self.url = url
        self._timeout_s = timeout_s

    @cached_property
    def _client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self._timeout_s,
            # An HTTP(S)_PROXY from the environment must not intercept 127.0.0.1.
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def __call__(self) -> bool:
        try:
            return self._client.get(self.url).status_code == httpx.codes.OK
        except httpx.HTTPError:
            return False
