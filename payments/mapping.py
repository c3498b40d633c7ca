"""Entities to their wire shapes (JSON and protobuf), driven by the attrs classes.

A field is written once, in its attrs class; the proto message (the contract) says which
of those fields go on the wire, matched by name. cattrs does the value conversion with
the contract's rules: enums as their numbers, 64-bit integers as plain ints (so JSON
numbers, not protojson's strings), maps as dicts, timestamps as RFC 3339 UTC to the
second (what the Go service wrote), and zero values left out, as protojson does.
The JSON object and the proto message are built from the same dict, so HTTP, gRPC and
the status callbacks cannot disagree. A new entity maps with one
``wire_mapping(Entity, pb.Message)`` line, which generates its ``to_json`` once from the
cattrs hooks of its fields' types (every read and callback maps a payment).
"""

from __future__ import annotations

import enum
import linecache
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import attrs
import cattrs
from cattrs.fns import identity
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from payments.gen import payments_pb2 as pb
from payments.model import Payment, Refund

E = TypeVar("E")
M = TypeVar("M", bound=Message)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC to the second, e.g. ``2026-11-29T18:45:15Z`` (fractions cut, as Go's
    ``time.RFC3339`` does). Storage keeps microseconds; only the wire drops them.

    A naive datetime is taken as UTC (that is what the database keeps). %-formatting of
    the fields: 0.49 us against 0.94 us for ``isoformat`` and 1.39 us for strftime, twice
    per payment on every read.
    """
    if moment.tzinfo is not UTC:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (  # noqa: UP031 - the fast form, see above
        moment.year,
        moment.month,
        moment.day,
        moment.hour,
        moment.minute,
        moment.second,
    )


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 string from the wire as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _is_int_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.IntEnum)


def _make_converter() -> cattrs.Converter:
    made = cattrs.Converter()
    made.register_unstructure_hook_func(_is_int_enum, int)
    made.register_unstructure_hook(datetime, format_timestamp)
    made.register_structure_hook(datetime, lambda value, _: parse_timestamp(value))
    return made


converter = _make_converter()


@attrs.frozen
class WireMapping(Generic[E, M]):
    """One attrs entity and its proto message, fields matched by name.

    Every field of the message must be an attrs field or a property of the entity (else
    building the mapping fails at import); entity fields the message lacks stay inside.
    """

    entity: type[E]
    message: type[M]
    names: tuple[str, ...]  # the message's fields, in field-number order
    _to_json: Callable[[E], dict[str, Any]]

    def to_json(self, entity: E) -> dict[str, Any]:
        """The JSON object: message fields in proto order, zero values left out."""
        return self._to_json(entity)

    def to_proto(self, entity: E) -> M:
        """The proto message, from the same values as :meth:`to_json`."""
        return self.message(**self._to_json(entity))

    def from_proto(self, message: M) -> E:
        """The entity from a message: its fields the message has, by name; the others
        take their defaults."""
        fields = {field.name: field for field in self.message.DESCRIPTOR.fields}
        values = {
            attribute.name: _proto_value(fields[attribute.name], getattr(message, attribute.name))
            for attribute in attrs.fields(self.entity)  # type: ignore[misc]
            if attribute.name in fields
        }
        return converter.structure(values, self.entity)


def _proto_value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict(value)
    if field.is_repeated:
        return list(value)
    return value


# Types cattrs unstructures as themselves: a property's value of one of these needs no
# dispatch.
_PLAIN_TYPES = frozenset({int, str, bool, float})


def _unstructure_value(value: Any) -> Any:
    """A property's value, unstructured by its run-time type (as cattrs would)."""
    return value if value.__class__ in _PLAIN_TYPES else converter.unstructure(value)


def _make_to_json(entity: type[E], names: tuple[str, ...]) -> Callable[[E], dict[str, Any]]:
    """``to_json`` for ``entity``, generated once: one line per message field, each with
    the cattrs hook of the attribute's declared type (inlined when it is the identity),
    a property's value by its run-time type, zero values left out.

    What cattrs' own generated function plus a filtering pass did, in one pass without
    the intermediate dict: 2.2 us against 6.3 us per payment (every read, every callback).
    """
    attributes = {attribute.name: attribute for attribute in attrs.fields(entity)}  # type: ignore[misc]
    scope: dict[str, Any] = {"_unstructure_value": _unstructure_value}
    lines = [f"def to_json_{entity.__name__}(entity):", "    document = {}"]
    for index, name in enumerate(names):
        attribute = attributes.get(name)
        if attribute is None:
            value = f"_unstructure_value(entity.{name})"
        else:
            hook = converter.get_unstructure_hook(attribute.type)
            if hook is identity:
                value = f"entity.{name}"
            else:
                scope[f"_hook_{index}"] = hook
                value = f"_hook_{index}(entity.{name})"
        lines += [f"    value = {value}", "    if value:", f"        document[{name!r}] = value"]
    lines.append("    return document")
    source = "\n".join(lines)
    filename = f"<wire mapping {entity.__module__}.{entity.__qualname__}>"
    exec(compile(source, filename, "exec"), scope)  # noqa: S102 - our own generated code
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return scope[f"to_json_{entity.__name__}"]  # type: ignore[no-any-return]


def wire_mapping(entity: type[E], message: type[M]) -> WireMapping[E, M]:
    """Map ``entity`` to ``message`` and register the mapping, so an entity nested in
    another (a list of attempts in a delivery) takes the same shape: map the nested
    entity first."""
    names = tuple(field.name for field in message.DESCRIPTOR.fields)
    attributes = {attribute.name for attribute in attrs.fields(attrs.resolve_types(entity))}  # type: ignore[arg-type]
    for name in names:
        if name not in attributes and not isinstance(getattr(entity, name, None), property):
            raise TypeError(f"{message.__name__}.{name} has no field on {entity.__name__}")
    mapping = WireMapping(
        entity=entity, message=message, names=names, to_json=_make_to_json(entity, names)
    )
    converter.register_unstructure_hook(entity, mapping.to_json)
    return mapping


PAYMENT: WireMapping[Payment, pb.Payment] = wire_mapping(Payment, pb.Payment)


def payment_to_json(payment: Payment) -> dict[str, Any]:
    """The JSON object of a payment: the HTTP responses and the status-callback bodies."""
    return PAYMENT.to_json(payment)


def payment_to_proto(payment: Payment) -> pb.Payment:
    """The protobuf message of a payment (the same values as :func:`payment_to_json`)."""
    return PAYMENT.to_proto(payment)


REFUND: WireMapping[Refund, pb.Refund] = wire_mapping(Refund, pb.Refund)


def refund_to_json(refund: Refund) -> dict[str, Any]:
    """The JSON object of a refund: the HTTP responses and the refund callbacks."""
    return REFUND.to_json(refund)


def refund_to_proto(refund: Refund) -> pb.Refund:
    """The protobuf message of a refund (the same values as :func:`refund_to_json`)."""
    return REFUND.to_proto(refund)
