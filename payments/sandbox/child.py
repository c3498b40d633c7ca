"""The emulator as a supervised child of ``payments serve`` (the embedded dev profile).

In the embedded profile the service runs its own Stripe: the emulator is one more
child of the root supervisor, listed before ``http`` so it accepts connections before
the first request can reach the provider, and so it stops after the servers drained.
Its events go to the service's own provider-callback route, signed with the
service's webhook secret, carrying a key the service's auth accepts (the part a
gateway plays in production)::

    state = StripeState(settings.stripe_secret_key)  # once, outside the tree
    ChildSpec(
        name="stripe-sandbox",
        start=sandbox_child(
            state,
            host="127.0.0.1",
            port=12111,
            webhook_url="http://127.0.0.1:8080/webhooks/providers/stripe",
            webhook_secret=settings.stripe_webhook_secret,
            gateway_api_key=dev_key,
        ),
        grace=1.0,
    )

Why these choices: the port is fixed because the Stripe client's ``api_base`` is built
once, before the tree, and a restart must come back at the same address; ``state``
lives outside the child so a restart keeps every session, link and event (a browser
tab still open on a checkout page keeps working). This module imports nothing from
``supervisor``: any context with ``stopping`` and ``started()`` will do.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from payments.sandbox.server import Sandbox, serve_sandbox
from payments.sandbox.state import StripeState

log = logging.getLogger("payments.sandbox")


class ChildRun(Protocol):
    """What the supervisor hands each run (supervisor.ChildContext fits)."""

    @property
    def stopping(self) -> trio.Event: ...

    def started(self) -> None: ...


def sandbox_child(
    state: StripeState,
    *,
    host: str = "127.0.0.1",
    port: int,
    webhook_url: str,
    webhook_secret: str,
    gateway_api_key: str = "",
    public_url: str | None = None,
    on_ready: Callable[[Sandbox], None] | None = None,
) -> Callable[[ChildRun], Awaitable[None]]:
    """A child's start function serving the emulator over ``state`` until the
    supervisor asks it to stop. ``on_ready`` sees each run's :class:`Sandbox` (say, to
    log or show its URL)."""
    if port <= 0:
        raise ValueError("a supervised sandbox needs a fixed port (restarts must keep its URL)")

    async def run(ctx: ChildRun) -> None:
        async with trio.open_nursery() as nursery:
            sandbox: Sandbox = await nursery.start(
                functools.partial(
                    serve_sandbox,
                    host,
                    port,
                    secret_key=state.secret_key,
                    state=state,
                    public_url=public_url,
                    webhook_url=webhook_url,
                    webhook_secret=webhook_secret,
                    gateway_api_key=gateway_api_key,
                    shutdown_trigger=ctx.stopping.wait,
                )
            )
            log.info(
                "stripe sandbox listening",
                extra={"url": sandbox.url, "dashboard": f"{sandbox.url}/_sandbox/dashboard"},
            )
            if on_ready is not None:
                on_ready(sandbox)
            ctx.started()

    return run
