"""Get and list over HTTP and gRPC: not found, filters, paging, callers kept apart."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from e2e.conftest import Database
from e2e.harness import (
    GATEWAY_KEY,
    ORDERS_KEY,
    SHOP,
    SHOP_KEY,
    GrpcClient,
    create_body,
    headers,
    payment_fields,
    rid,
)
from payments.gen import payments_pb2 as pb
from payments.model import PaymentStatus

MISSING_ID = 9_000_000_000_000  # no test gets anywhere near this many payments


async def test_not_found(http: httpx.AsyncClient, grpc_client: GrpcClient) -> None:
    response = await http.get(f"/payments/{MISSING_ID}", headers=headers())
    assert response.status_code == 404, response.text
    assert response.json() == {"error": "payment not found"}
    response = await http.post(f"/payments/{MISSING_ID}/cancel", headers=headers())
    assert response.status_code == 404, response.text
    assert response.json() == {"error": "payment not found"}
    for method, message in (
        ("GetPayment", pb.GetPaymentRequest(id=MISSING_ID)),
        ("CancelPayment", pb.CancelPaymentRequest(id=MISSING_ID)),
    ):
        code, details, _ = await grpc_client.error(method, message)
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert details == "payment not found"


async def test_get_over_both_transports(http: httpx.AsyncClient, grpc_client: GrpcClient) -> None:
    created = await http.post("/payments", json=create_body(), headers=headers())
    assert created.status_code == 201, created.text
    payment = created.json()["payment"]
    response = await http.get(f"/payments/{payment['id']}", headers=headers())
    assert response.status_code == 200, response.text
    assert response.json() == {"payment": payment}
    reply, _ = await grpc_client.call("GetPayment", pb.GetPaymentRequest(id=payment["id"]))
    assert payment_fields(reply.payment) == payment


async def test_another_callers_payment_is_invisible(
    http: httpx.AsyncClient, grpc_client: GrpcClient
) -> None:
    """``shop`` gets 404 for ``orders``' payment on get and cancel, and its list never
    shows it; the payment is left as it was. The trusted gateway does see it."""
    resource_type = rid("isolation")
    created = await http.post(
        "/payments", json=create_body(resource_type=resource_type), headers=headers()
    )
    assert created.status_code == 201, created.text
    payment = created.json()["payment"]
    pid = payment["id"]

    shop = headers(SHOP_KEY)
    assert (await http.get(f"/payments/{pid}", headers=shop)).status_code == 404
    canceled = await http.post(f"/payments/{pid}/cancel", headers=shop)
    assert canceled.status_code == 404, canceled.text
    listed = await http.get("/payments", params={"resource_type": resource_type}, headers=shop)
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"payments": []}
    everything = await http.get("/payments", params={"limit": 500}, headers=shop)
    assert pid not in [p["id"] for p in everything.json()["payments"]]

    for method, message in (
        ("GetPayment", pb.GetPaymentRequest(id=pid)),
        ("CancelPayment", pb.CancelPaymentRequest(id=pid)),
    ):
        code, details, _ = await grpc_client.error(method, message, key=SHOP_KEY)
        assert code == grpc.StatusCode.NOT_FOUND, details
    reply, _ = await grpc_client.call(
        "ListPayments", pb.ListPaymentsRequest(resource_type=resource_type), key=SHOP_KEY
    )
    assert list(reply.payments) == []

    still = await http.get(f"/payments/{pid}", headers=headers())
    assert still.json()["payment"] == payment
    seen = await http.get(f"/payments/{pid}", headers=headers(GATEWAY_KEY))
    assert seen.status_code == 200, seen.text


@pytest.fixture
async def listing(http: httpx.AsyncClient, db: Database) -> dict[str, Any]:
    """Five ``orders`` payments under a fresh resource_type (r1 twice, r2, r3, r4; one
    PAID, the rest PENDING) and one ``shop`` payment under it. Ids oldest first."""
    resource_type = rid("list")
    payments = []
    for resource_id, method in (("r1", 1), ("r1", 2), ("r2", 1), ("r3", 2), ("r4", 1)):
        body = create_body(
            resource_type=resource_type, resource_id=resource_id, payment_method=method
        )
        response = await http.post("/payments", json=body, headers=headers())
        assert response.status_code == 201, response.text
        payments.append(response.json()["payment"])
    await db.set_status(payments[2]["id"], PaymentStatus.PAID)
    shop = await http.post(
        "/payments",
        json=create_body(resource_type=resource_type, caller_service=SHOP),
        headers=headers(SHOP_KEY),
    )
    assert shop.status_code == 201, shop.text
    return {
        "resource_type": resource_type,
        "ids": [p["id"] for p in payments],
        "request_ids": [p["request_id"] for p in payments],
        "shop_id": shop.json()["payment"]["id"],
    }


async def list_http(http: httpx.AsyncClient, key: str = ORDERS_KEY, **params: Any) -> list[int]:
    response = await http.get("/payments", params=params, headers=headers(key))
    assert response.status_code == 200, response.text
    return [p["id"] for p in response.json()["payments"]]


async def list_grpc(grpc_client: GrpcClient, key: str = ORDERS_KEY, **fields: Any) -> list[int]:
    reply, _ = await grpc_client.call("ListPayments", pb.ListPaymentsRequest(**fields), key=key)
    return [p.id for p in reply.payments]


async def test_list_filters_over_http(http: httpx.AsyncClient, listing: dict[str, Any]) -> None:
    rt = listing["resource_type"]
    ids = listing["ids"]
    newest_first = ids[::-1]
    assert await list_http(http, resource_type=rt) == newest_first
    assert await list_http(http, resource_type=rt, resource_id="r1") == [ids[1], ids[0]]
    assert await list_http(http, request_id=listing["request_ids"][3]) == [ids[3]]
    assert await list_http(http, resource_type=rt, status=10) == [ids[2]]
    assert await list_http(http, resource_type=rt, status=2) == [ids[4], ids[3], ids[1], ids[0]]
    assert await list_http(http, resource_type=rt, status=40) == []
    assert await list_http(http, resource_type=rt, provider=1) == newest_first
    assert await list_http(http, resource_type=rt, provider="stripe") == newest_first
    assert await list_http(http, resource_type=rt, caller_service="orders") == newest_first
    # paging
    assert await list_http(http, resource_type=rt, limit=2) == newest_first[:2]
    assert await list_http(http, resource_type=rt, limit=2, offset=2) == newest_first[2:4]
    assert await list_http(http, resource_type=rt, limit=2, offset=4) == newest_first[4:]
    assert await list_http(http, resource_type=rt, offset=5) == []
    # another caller sees only its own; the trusted gateway sees everyone's
    assert await list_http(http, SHOP_KEY, resource_type=rt) == [listing["shop_id"]]
    assert await list_http(http, GATEWAY_KEY, resource_type=rt) == [
        listing["shop_id"],
        *newest_first,
    ]
    assert (
        await list_http(http, GATEWAY_KEY, resource_type=rt, caller_service="orders")
        == newest_first
    )


async def test_list_filters_over_grpc(grpc_client: GrpcClient, listing: dict[str, Any]) -> None:
    rt = listing["resource_type"]
    ids = listing["ids"]
    newest_first = ids[::-1]
    assert await list_grpc(grpc_client, resource_type=rt) == newest_first
    assert await list_grpc(grpc_client, resource_type=rt, resource_id="r1") == [ids[1], ids[0]]
    assert await list_grpc(grpc_client, request_id=listing["request_ids"][3]) == [ids[3]]
    paid = await list_grpc(grpc_client, resource_type=rt, has_status=True, status=10)
    assert paid == [ids[2]]
    assert await list_grpc(grpc_client, resource_type=rt, status=10) == [ids[2]]
    assert await list_grpc(grpc_client, resource_type=rt, provider=1) == newest_first
    assert await list_grpc(grpc_client, resource_type=rt, caller_service="orders") == newest_first
    assert await list_grpc(grpc_client, resource_type=rt, limit=2, offset=2) == newest_first[2:4]
    assert await list_grpc(grpc_client, SHOP_KEY, resource_type=rt) == [listing["shop_id"]]
    assert await list_grpc(grpc_client, GATEWAY_KEY, resource_type=rt) == [
        listing["shop_id"],
        *newest_first,
    ]


async def test_list_of_another_caller_service_is_refused(
    http: httpx.AsyncClient, grpc_client: GrpcClient
) -> None:
    response = await http.get("/payments", params={"caller_service": "shop"}, headers=headers())
    assert response.status_code == 403, response.text
    code, details, _ = await grpc_client.error(
        "ListPayments", pb.ListPaymentsRequest(caller_service="shop")
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED, details


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "abc"}, "status"),
        ({"status": "99"}, "status"),
        ({"status": "0"}, "status"),
        ({"provider": "paypal"}, "provider"),
        ({"provider": "7"}, "provider"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "1.5"}, "offset"),
        ({"resource_type": "x" * 129}, "resource_type"),
    ],
)
async def test_list_bad_values_over_http(
    http: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    response = await http.get("/payments", params=params, headers=headers())
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}:"), response.text


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"has_status": True, "status": 99}, "status"),
        ({"has_status": True}, "status"),
        ({"provider": 7}, "provider"),
        ({"limit": 501}, "limit"),
        ({"limit": -1}, "limit"),
        ({"offset": -1}, "offset"),
    ],
)
async def test_list_bad_values_over_grpc(
    grpc_client: GrpcClient, fields: dict[str, Any], field: str
) -> None:
    code, details, _ = await grpc_client.error("ListPayments", pb.ListPaymentsRequest(**fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details
