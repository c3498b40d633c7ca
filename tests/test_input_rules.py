"""Property tests of the input rules, without servers (issue 9, classes 1, 4 and 6).

The callback URL rule (payments.callback_urls) over generated addresses and URLs; the
content rules of payments.validation over generated identifiers and metadata; the
Stripe event reader over events of every shape. Each property says what holds for all
inputs, so a new bypass form (another way to write 127.0.0.1) fails here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payments.callback_urls import CallbackPolicy, UrlRefused, check_url, parse_policy
from payments.config import ConfigError, load_settings
from payments.errors import InvalidArgument
from payments.model import CreatePaymentInput
from payments.providers.base import ProviderEvent
from payments.providers.stripe_events import read_event
from payments.validation import validate_create, validate_list

RULES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DEFAULT = CallbackPolicy()
ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


def _url_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


# --- class 4: the callback URL rule ------------------------------------------------------


@RULES
@given(st.one_of(ipv4, ipv6))
def test_an_address_is_allowed_by_default_exactly_when_it_is_global(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    url = f"https://{_url_host(address)}:8443/cb"
    plain = address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address
    expected = plain.is_global and not (
        plain.is_multicast or plain.is_reserved or plain.is_link_local or plain.is_unspecified
    )
    assert (DEFAULT.url_problem(url) == "") is expected, (url, DEFAULT.url_problem(url))


@RULES
@given(ipv4, st.sampled_from(["int", "hex", "octal", "short", "padded"]))
def test_every_non_canonical_ipv4_form_is_refused_whatever_the_allow_list(
    address: ipaddress.IPv4Address, form: str
) -> None:
    number = int(address)
    octets = str(address).split(".")
    written = {
        "int": str(number),
        "hex": hex(number),
        "octal": ".".join(f"0{int(o):o}" for o in octets),
        "short": f"{octets[0]}.{number & 0xFFFFFF}",
        "padded": ".".join(o.zfill(3) for o in octets),
    }[form]
    if written == str(address):  # "padded" of 100.100.100.100 is canonical already
        return
    everything = parse_policy(["10.0.0.0/8", "*.example"], allow_loopback=True)
    for policy in (DEFAULT, everything):
        problem = policy.url_problem(f"http://{written}/cb")
        assert "non-canonical" in problem or "invalid" in problem, (written, problem)


@RULES
@given(
    st.from_regex(r"[a-z0-9]{1,8}(:[a-z0-9]{0,8})?", fullmatch=True),
    st.sampled_from(["orders.internal", "8.8.8.8", "[2001:4860::8888]", "localhost"]),
)
def test_userinfo_is_always_refused(userinfo: str, host: str) -> None:
    policy = parse_policy(["orders.internal", "8.8.8.8", "localhost"], allow_loopback=True)
    assert "user:password@" in policy.url_problem(f"https://{userinfo}@{host}/cb")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://0.0.0.0:8080/x",
        "http://0.1.2.3/x",
        "http://[::]/x",
        "http://[::ffff:169.254.169.254]/x",
        "http://224.0.0.1/x",
        "http://255.255.255.255/x",
    ],
)
def test_link_local_unspecified_multicast_are_refused_whatever_the_policy(url: str) -> None:
    wide = parse_policy(["10.0.0.0/8", "*.internal"], allow_loopback=True)
    for policy in (DEFAULT, wide):
        assert policy.url_problem(url) != ""
    # A listed name that resolves there is refused at delivery all the same.
    address = ipaddress.ip_address(urlsplit(url).hostname or "")
    assert wide.address_problem(address, name_allowed=True) != ""


@pytest.mark.parametrize(
    ("url", "entries", "loopback", "allowed"),
    [
        ("http://127.0.0.1:9000/cb", [], False, False),
        ("http://127.0.0.1:9000/cb", [], True, True),
        ("http://[::1]/cb", [], True, True),
        ("http://[::ffff:127.0.0.1]/cb", [], False, False),
        ("http://localhost/cb", [], False, False),
        ("http://api.localhost/cb", [], False, False),
        ("http://localhost/cb", [], True, True),
        ("http://10.1.2.3/cb", [], False, False),
        ("http://10.1.2.3/cb", ["10.0.0.0/8"], False, True),
        ("http://10.1.2.3/cb", ["10.1.2.3"], False, True),
        ("http://192.168.1.1/cb", ["10.0.0.0/8"], False, False),
        ("http://100.64.0.1/cb", [], False, False),
        ("https://orders.internal/cb", [], False, True),
        ("https://orders.internal/cb", ["billing.internal"], False, False),
        ("https://a.orders.internal/cb", ["*.orders.internal"], False, True),
        ("https://orders.internal/cb", ["*.orders.internal"], False, False),
        ("https://Orders.Internal./cb", ["orders.internal"], False, True),
        ("https://orders.internal/cb", ["10.0.0.0/8"], False, False),  # ranges admit addresses
        ("https://8.8.8.8/cb", ["orders.internal"], False, False),
        ("https://8.8.8.8/cb", [], False, True),
        ("http://[::1/cb", [], True, False),
        ("http://orders internal/cb", [], False, False),
        ("http://orders.internal:0/cb", [], False, False),
        ("http://[fe80::1%25eth0]/cb", [], False, False),
    ],
)
def test_the_rule_on_examples(url: str, entries: list[str], loopback: bool, allowed: bool) -> None:
    problem = parse_policy(entries, allow_loopback=loopback).url_problem(url)
    assert (problem == "") is allowed, problem


@RULES
@given(st.text(max_size=80))
def test_check_url_refuses_or_accepts_any_text_and_never_crashes(text: str) -> None:
    for candidate in (text, f"http://{text}", f"https://{text}/cb", f"http://[{text}]/"):
        with contextlib.suppress(UrlRefused):
            check_url(candidate, DEFAULT)


@pytest.mark.parametrize(
    "entry", ["http://x", "a b", "10.0.0.0/33", "169.254.0.0/16", "0.0.0.0/0", "*.", "2130706433"]
)
def test_a_bad_allow_list_entry_stops_the_start(entry: str) -> None:
    with pytest.raises(ConfigError, match="PAYMENTS_CALLBACK_ALLOWED_HOSTS"):
        load_settings({"PAYMENTS_CALLBACK_ALLOWED_HOSTS": f"ok.internal,{entry}"}, None)


def test_the_allow_list_parses_its_four_forms() -> None:
    settings = load_settings(
        {"PAYMENTS_CALLBACK_ALLOWED_HOSTS": "Orders.Internal, *.svc.local,10.0.0.7,fd00::/8"},
        None,
    )
    policy = settings.callback_policy()
    assert policy.names == {"orders.internal"}
    assert policy.suffixes == (".svc.local",)
    assert [str(n) for n in policy.networks] == ["10.0.0.7/32", "fd00::/8"]
    assert not policy.allow_loopback


# --- class 1 and 6: create and list input -----------------------------------------------

VALID: dict[str, Any] = {
    "request_id": "r-1",
    "caller_service": "svc-a",
    "resource_type": "order",
    "resource_id": "1042",
    "amount_cents": 2500,
    "currency": "usd",
    "payment_method": 1,
    "payment_type": 1,
    "status_callback_url": "https://svc-a.internal/cb",
}
IDENTIFIERS = ["request_id", "caller_service", "resource_type", "resource_id", "customer_ref"]
UNSAFE_IN_IDENTIFIERS = st.sampled_from(
    [chr(c) for c in range(0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u061c", "\u200e", "\u200f", "\u2028", "\u2029"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)
SAFE_TEXT = st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=10)


@RULES
@given(st.sampled_from(IDENTIFIERS), SAFE_TEXT, UNSAFE_IN_IDENTIFIERS, SAFE_TEXT)
def test_identifiers_refuse_control_and_bidi_characters(
    field: str, before: str, bad: str, after: str
) -> None:
    raw = CreatePaymentInput(**{**VALID, field: before + bad + after})
    with pytest.raises(InvalidArgument) as caught:
        validate_create(raw)
    assert caught.value.field == field
    if field != "customer_ref":  # the list filters take the other four
        with pytest.raises(InvalidArgument) as caught:
            validate_list(**{field: before + bad + after})
        assert caught.value.field == field


@RULES
@given(
    SAFE_TEXT,
    st.sampled_from(["\x00", "\x1b", "\n", "\r", "\x85", "\u2028", "\u202e", "\x7f"]),
    SAFE_TEXT,
)
def test_metadata_values_refuse_nul_escape_and_newlines(before: str, bad: str, after: str) -> None:
    raw = CreatePaymentInput(**VALID, metadata={"note": before + bad + after})
    with pytest.raises(InvalidArgument) as caught:
        validate_create(raw)
    assert caught.value.field == "metadata"
    ok = CreatePaymentInput(**VALID, metadata={"note": f"{before}\t{after} \u200f"})
    assert validate_create(ok).metadata == {"note": f"{before}\t{after} \u200f"}


@pytest.mark.parametrize("field", ["status_callback_url", "success_url", "cancel_url"])
@pytest.mark.parametrize(
    "url", ["http://[::1", "http://a b.example/x", "http://u:p@orders.internal/", "http://x:y/"]
)
def test_urls_that_do_not_parse_are_400_naming_the_field(field: str, url: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_create(CreatePaymentInput(**{**VALID, field: url}))
    assert caught.value.field == field


def test_offset_is_bounded() -> None:
    with pytest.raises(InvalidArgument, match=r"^offset: "):
        validate_list(offset=2**63)


# --- class 1: Stripe events of unexpected shape -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
EVENT_TYPE_NAMES = [
    "checkout.session.completed",
    "checkout.session.expired",
    "checkout.session.async_payment_succeeded",
    "invoice.paid",
    "invoice.payment_failed",
    "customer.subscription.deleted",
    "product.created",
]
EVENT_TYPES = st.sampled_from(EVENT_TYPE_NAMES)


def odd(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field as Stripe sends it, or anything else JSON can carry."""
    return st.one_of(valid, json_values)


def template(event_type: str) -> dict[str, Any]:
    """A well-formed event touching every field the reader reads."""
    line = {
        "subscription": "sub_1",
        "metadata": {"callback_hash": "h-1"},
        "parent": {"subscription_item_details": {"subscription": "sub_1"}},
    }
    obj = {
        "id": "cs_1",
        "object": "checkout.session",
        "payment_status": "paid",
        "payment_link": "plink_1",
        "subscription": {"id": "sub_1", "metadata": {"callback_hash": "h-1"}},
        "metadata": {"callback_hash": "h-1"},
        "parent": {"subscription_details": {"subscription": "sub_1", "metadata": {}}},
        "subscription_details": {"metadata": {}},
        "lines": {"data": [line]},
    }
    data = {"object": obj}
    return {"id": "evt_1", "object": "event", "type": event_type, "created": 1, "data": data}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        items: list[tuple[Any, Any]] = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return []
    return [p for key, child in items for p in [(*prefix, key), *_paths(child, (*prefix, key))]]


EVENT_PATHS = _paths(template("x"))


def corrupted(event_type: str, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """The template with the value at ``path`` replaced (or removed, for a sentinel)."""
    event = template(event_type)
    node: Any = event
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return event


stripe_events = st.one_of(
    st.builds(corrupted, EVENT_TYPES, st.sampled_from(EVENT_PATHS), json_values),
    st.builds(template, EVENT_TYPES),
)


@RULES
@given(json_values)
def test_any_field_of_any_event_type_may_be_odd_the_reader_refuses_or_reads(value: Any) -> None:
    """Every (event type, field) pair with the drawn value: read, or 400 on ``payload``."""
    for event_type in EVENT_TYPE_NAMES:
        for path in EVENT_PATHS:
            try:
                read = read_event(json.dumps(corrupted(event_type, path, value)))
            except InvalidArgument as exc:
                assert exc.field == "payload"
                continue
            assert all(isinstance(ref, str) and ref for ref in read.refs)
            assert isinstance(read.callback_hash, str)


@RULES
@given(json_values)
def test_an_event_of_any_shape_is_read_or_refused_as_invalid_argument(event: Any) -> None:
    try:
        read = read_event(json.dumps(event))
    except InvalidArgument as exc:
        assert exc.field == "payload"
        return
    assert isinstance(read, ProviderEvent)


@pytest.mark.parametrize(
    "change",
    [
        {"payment_status": []},
        {"payment_status": {"a": 1}},
        {"id": 12345},
        {"metadata": ["callback_hash", "h"]},
        {"metadata": {"callback_hash": 7}},
        {"subscription": 42},
        {"lines": {"data": {"not": "a list"}}},
        {"parent": "sub_1"},
        {"payment_link": ["plink"]},
    ],
)
def test_an_event_with_a_field_of_the_wrong_type_is_refused(change: dict[str, Any]) -> None:
    session = {"id": "cs_1", "object": "checkout.session", "payment_status": "paid", **change}
    event = {"id": "evt_1", "object": "event", "type": "checkout.session.completed"}
    with pytest.raises(InvalidArgument, match=r"^payload: "):
        read_event(json.dumps({**event, "data": {"object": session}}))
    with pytest.raises(InvalidArgument, match=r"^payload: "):
        read_event(json.dumps({**event, "data": {"object": [session]}}))
    with pytest.raises(InvalidArgument, match=r"^payload: .*UTF-8"):
        read_event(json.dumps({**event, "id": "evt_\ud800", "data": {"object": {}}}))
