"""The operations endpoints of the real process: /readyz, /openapi.json (no headers)
and gRPC server reflection, as ``payments serve`` wires them."""

from __future__ import annotations

import grpc
import httpx
import trio
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from e2e.harness import ServiceProcess
from payments.api.openapi import build_document


async def test_readyz_and_the_document_answer_without_headers(http: httpx.AsyncClient) -> None:
    ready = await http.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    document = await http.get("/openapi.json")
    assert document.status_code == 200
    assert document.json() == build_document()


def _reflected_methods(target: str) -> tuple[list[str], list[str]]:
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("payments.PaymentsService")
        return list(database.get_services()), [method.name for method in service.methods]


async def test_grpc_reflection_lists_and_describes_the_service(service: ServiceProcess) -> None:
    services, methods = await trio.to_thread.run_sync(_reflected_methods, service.grpc_target)
    assert "payments.PaymentsService" in services
    assert "grpc.reflection.v1.ServerReflection" in services
    assert {"CreatePayment", "ListPayments", "HandleProviderCallback"} <= set(methods)
