"""The MLflow tracking server (`mlflow server`), SQLite and artifacts in the state folder."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping, Sequence

from processor.errors import StackError
from processor.settings import StackSettings
from processor.stack.layout import ServiceName, StackLayout
from processor.stack.ports import LOOPBACK
from processor.stack.service import HttpHealthCheck, LaunchSpec, Say

_DEFAULT_ENV = {
    # The job runner (huey consumers for scorers and trace rollups) is not used by the
    # processor; without it the server is one process lighter and starts faster.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


class MlflowService:
    """`mlflow server` on 127.0.0.1 with one worker.

    MLflow 3's default host and CORS checks already accept ``localhost`` and ``127.0.0.1`` on
    any port, which is every way a local client reaches it, so no security flags are passed.
    ``extra_args`` (e.g. ``--app-name basic-auth``) go last; ``extra_env`` holds what they need
    (``MLFLOW_FLASK_SERVER_SECRET_KEY``, ``MLFLOW_AUTH_ADMIN_PASSWORD``).
    """

    def __init__(
        self,
        settings: StackSettings,
        layout: StackLayout,
        extra_args: Sequence[str],
        extra_env: Mapping[str, str],
    ) -> None:
        self._settings = settings
        self._health_check = HttpHealthCheck(
            f"http://{LOOPBACK}:{self._settings.mlflow_port}/health"
        )
        self._home = layout.data_dir("mlflow")
        self._extra_args = list(extra_args)
        self._extra_env = dict(extra_env)

    @property
    def name(self) -> ServiceName:
        return "mlflow"

    @property
    def ports(self) -> dict[str, int]:
        return {"mlflow_port": self._settings.mlflow_port}

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self._settings.mlflow_port}"

    def prepare(self, say: Say) -> LaunchSpec:
        try:
            # The full server package: mlflow-skinny alone has the client but not the server.
            importlib.metadata.distribution("mlflow")
        except importlib.metadata.PackageNotFoundError as exc:
            raise StackError(
                "the MLflow server is not installed in this Python environment; "
                "install the stack extra: pip install 'agent-trace-processor[stack]'"
            ) from exc
        artifacts = self._home / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self._home / 'mlflow.db'}",
            # Clients upload artifacts through the server (mlflow-artifacts:/ URIs), so they
            # need no access to this folder.
            "--serve-artifacts", "--artifacts-destination", str(artifacts),
            "--host", LOOPBACK, "--port", str(self._settings.mlflow_port),
            "--workers", "1",
            *self._extra_args,
        ]  # fmt: skip
        # cwd: files MLflow places relative to it (basic-auth's basic_auth.db) stay in the
        # state folder.
        return LaunchSpec(command=command, cwd=self._home, env={**_DEFAULT_ENV, **self._extra_env})

    def is_healthy(self) -> bool:
        return self._health_check()
