"""Arize Phoenix (`phoenix serve`) from this Python environment, with SQLite in the state folder."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping
from pathlib import Path

from processor.errors import StackError
from processor.settings import StackSettings
from processor.stack.layout import ServiceName, StackLayout
from processor.stack.ports import LOOPBACK
from processor.stack.service import HttpHealthCheck, LaunchSpec, Say

# Inherited from the caller's shell these would point Phoenix at another database; the local
# stack is SQLite in its own folder by design.
_FOREIGN_DATABASE_ENV = (
    "PHOENIX_SQL_DATABASE_URL",
    "PHOENIX_SQL_DATABASE_SCHEMA",
    "PHOENIX_POSTGRES_HOST",
    "PHOENIX_POSTGRES_PORT",
    "PHOENIX_POSTGRES_USER",
    "PHOENIX_POSTGRES_PASSWORD",
    "PHOENIX_POSTGRES_DB",
)


class PhoenixService:
    """`phoenix serve` on 127.0.0.1; ``extra_env`` (auth, queue size, ...) overrides defaults.

    The OTLP gRPC port listens on every interface whatever PHOENIX_HOST says: Phoenix binds
    it to ``[::]`` unconditionally.
    """

    def __init__(
        self, settings: StackSettings, layout: StackLayout, extra_env: Mapping[str, str]
    ) -> None:
        self._settings = settings
        self._health_check = HttpHealthCheck(
            f"http://{LOOPBACK}:{self._settings.phoenix_port}/healthz"
        )
        self._working_dir = layout.data_dir("phoenix")
        self._extra_env = dict(extra_env)

    @property
    def name(self) -> ServiceName:
        return "phoenix"

    @property
    def ports(self) -> dict[str, int]:
        return {
            "phoenix_port": self._settings.phoenix_port,
            "phoenix_grpc_port": self._settings.phoenix_grpc_port,
        }

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self._settings.phoenix_port}"

    def prepare(self, say: Say) -> LaunchSpec:
        try:
            # Metadata, not an import: importing phoenix takes many seconds.
            importlib.metadata.distribution("arize-phoenix")
        except importlib.metadata.PackageNotFoundError as exc:
            raise StackError(
                "Phoenix is not installed in this Python environment; "
                "install the stack extra: pip install 'agent-trace-processor[stack]'"
            ) from exc
        self._working_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "PHOENIX_WORKING_DIR": str(self._working_dir),
            "PHOENIX_HOST": LOOPBACK,
            "PHOENIX_PORT": str(self._settings.phoenix_port),
            "PHOENIX_GRPC_PORT": str(self._settings.phoenix_grpc_port),
            # Telemetry pixels off; and no downloads of its own (the WASM sandbox binary it
            # otherwise fetches at start-up), so the stack starts the same offline.
            "PHOENIX_TELEMETRY_ENABLED": "false",
            "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
            **self._extra_env,
        }
        return LaunchSpec(
            command=[*_phoenix_command(), "serve"],
            cwd=self._working_dir,
            env=env,
            unset_env=[name for name in _FOREIGN_DATABASE_ENV if name not in self._extra_env],
        )

    def is_healthy(self) -> bool:
        return self._health_check()


def _phoenix_command() -> list[str]:
    # The console script next to this interpreter is the same environment; `-m` covers
    # installs without scripts.
    script = Path(sys.executable).parent / "phoenix"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "phoenix.server.main"]
