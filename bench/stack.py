"""Everything a benchmark run starts, in one place: a fresh MariaDB database
(``payments_test_<time>_bench_<random>``, made as the tests make theirs, migrated by
``payments migrate`` and dropped at the end), the Stripe emulator, the Auth server, the
callback receiver, the two ceiling servers and ``payments serve`` itself (started as the
e2e tests start it), each a separate process.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx

from bench.db import server_dsn
from bench.procs import Announced, ProcessError, bench_env, python_module
from e2e.harness import PAYMENTS_BIN, ServiceProcess, free_port, start_service
from payments.config import MysqlDsn
from tests.fixtures.auth import APP_API_KEY, GATEWAY_KEY, ORDERS_KEY, SERVICE_NAME
from tests.fixtures.db import MysqlServer, dsn_url

STRIPE_KEY = "sk_test_benchSecretKey7c2e9a41d0b6f3"
STRIPE_WEBHOOK_SECRET = "whsec_benchWebhookSecret3f8a1c6e2b"
CALLBACK_SIGNING_SECRET = "whsec_" + base64.b64encode(b"bench-callback-signing-key-32byt").decode()
CALLER_KEY = ORDERS_KEY  # the caller (service "orders") the load is sent as
CALLER = "orders"

__all__ = ["CALLER", "CALLER_KEY", "STRIPE_KEY", "Stack"]


@attrs.define
class Stack:
    """The running processes of one benchmark run (see :meth:`open`)."""

    workdir: Path
    db: MysqlDsn
    sandbox: Announced
    auth: Announced
    receiver: Announced
    ceiling_http: Announced
    ceiling_grpc: Announced
    service: ServiceProcess | None
    service_env: dict[str, str]

    @property
    def sandbox_url(self) -> str:
        return self.sandbox.where

    @property
    def receiver_url(self) -> str:
        return f"http://127.0.0.1:{self.receiver.where}"

    @property
    def ceiling_http_url(self) -> str:
        return f"http://127.0.0.1:{self.ceiling_http.where}"

    @property
    def ceiling_grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.ceiling_grpc.where}"

    def job_env(self, **extra: str) -> dict[str, str]:
        """The environment of a one-off job command (the service's, plus ``extra``)."""
        return {**self.service_env, **extra}

    def start_cli(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        """Start ``payments <args>`` in the scratch directory (stdout and stderr piped)."""
        return subprocess.Popen(
            [str(PAYMENTS_BIN), *args],
            env=env,
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop_service(self) -> int:
        """SIGTERM ``payments serve``; its exit code."""
        if self.service is None:
            return 0
        code = self.service.terminate(timeout=20)
        self.service = None
        return code

    # --- the emulator's control API ------------------------------------------------------

    def sandbox_control(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(
            method,
            f"{self.sandbox_url}/_sandbox/{path}",
            json=body,
            headers={"Authorization": f"Bearer {STRIPE_KEY}"},
            timeout=30,
        )
        if response.status_code != 200:
            raise ProcessError(f"sandbox {method} {path}: {response.status_code} {response.text}")
        return response.json()

    def receiver_stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.receiver_url}/_stats", timeout=30).json()

    def receiver_count(self) -> int:
        return int(httpx.get(f"{self.receiver_url}/_count", timeout=10).json()["count"])

    def receiver_reset(self) -> None:
        httpx.post(f"{self.receiver_url}/_reset", timeout=10)

    # --- start and stop -------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, keep: bool = False, overrides: Mapping[str, str] | None = None
    ) -> Iterator[Stack]:
        """Start everything; stop it all (and drop the database) on the way out.
        ``overrides`` are added to the environment of ``payments serve`` and of the job
        commands (experiments: ``MYSQL_MAX_IDLE_CONNS=10``, ``LOG_LEVEL=warning``...)."""
        workdir = Path(tempfile.mkdtemp(prefix="payments-bench-"))
        env = bench_env(workdir)
        server = MysqlServer(server_dsn())
        started: list[Announced] = []
        service: ServiceProcess | None = None
        try:
            db = server.create_database("bench")
            migrated = subprocess.run(
                [str(PAYMENTS_BIN), "migrate"],
                env={**env, "MYSQL_DSN": dsn_url(db)},
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if migrated.returncode != 0:
                raise ProcessError(f"payments migrate failed:\n{migrated.stderr}")

            http_port, grpc_port = free_port(), free_port()
            webhook_base = f"http://127.0.0.1:{http_port}/webhooks/providers/stripe"

            def announced(name: str, *args: str) -> Announced:
                process = Announced(name, python_module(*args), env, workdir)
                started.append(process)
                return process

            sandbox = announced(
                "sandbox",
                "payments.sandbox",
                "--port=0",
                f"--secret-key={STRIPE_KEY}",
                f"--webhook-url={webhook_base}",
                f"--webhook-secret={STRIPE_WEBHOOK_SECRET}",
                f"--gateway-api-key={GATEWAY_KEY}",
            )
            auth = announced("auth", "bench.auth_server", "--port=0")
            receiver = announced("receiver", "bench.receiver", "--port=0")
            ceiling_http = announced("ceiling-http", "bench.ceiling_http", "--port=0")
            ceiling_grpc = announced("ceiling-grpc", "bench.ceiling_grpc", "--port=0")
            service_env = {
                **env,
                "APP_SERVICE_NAME": SERVICE_NAME,
                "APP_API_KEY": APP_API_KEY,
                "AUTH_SERVICE_GRPC_ADDR": auth.where,
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(http_port),
                "GRPC_HOST": "127.0.0.1",
                "GRPC_PORT": str(grpc_port),
                "MYSQL_DSN": dsn_url(db),
                "STRIPE_SECRET_KEY": STRIPE_KEY,
                "STRIPE_API_BASE": sandbox.where,
                "STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
                "PAYMENTS_PROVIDER_CALLBACK_BASE_URL": webhook_base,
                "PAYMENTS_CALLBACK_SIGNING_SECRET": CALLBACK_SIGNING_SECRET,
                "PAYMENTS_TRUSTED_CALLERS": "gateway",
                # The callback receiver listens on loopback, refused unless allow-listed.
                "PAYMENTS_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
                "LOG_LEVEL": "info",
                **(overrides or {}),
            }
            service = start_service(service_env, workdir / "serve")
            yield cls(
                workdir=workdir,
                db=db,
                sandbox=sandbox,
                auth=auth,
                receiver=receiver,
                ceiling_http=ceiling_http,
                ceiling_grpc=ceiling_grpc,
                service=service,
                service_env=service_env,
            )
        finally:
            if service is not None:
                # terminate() kills it first when it will not stop; that is reported
                # by stop_service, here only the clean-up counts.
                with contextlib.suppress(AssertionError):
                    service.terminate(timeout=20)
            for process in reversed(started):
                process.stop()
            for name in list(server.created):
                server.drop_database(name)
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)
