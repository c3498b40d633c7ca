"""The generic entity <-> proto mapping: a field added to an attrs class and to its proto
message reaches JSON and protobuf with no other edit, nested entities included.

The messages are built at run time from a descriptor, so the test needs no generated code
and shows what a new message (Refund, CallbackDelivery) gets from one mapping line.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from payments.mapping import wire_mapping

FieldType = descriptor_pb2.FieldDescriptorProto
AT = datetime(2026, 11, 29, 18, 45, 15, 654321, tzinfo=UTC)
AT_TEXT = "2026-11-29T18:45:15Z"  # to the second: the fraction is cut


class Color(enum.IntEnum):
    UNSPECIFIED = 0
    RED = 1


@attrs.frozen
class Attempt:
    at: datetime
    status_code: int = 0


@attrs.frozen
class Item:
    id: int
    name: str
    color: Color
    amount: int
    tags: dict[str, str]
    created_at: datetime
    secret: str = ""  # not in the message: stays inside
    attempts: list[Attempt] = attrs.field(factory=list)
    next_at: datetime | None = None

    @property
    def doubled(self) -> int:
        return self.amount * 2


@attrs.frozen
class ItemWithNote(Item):
    note: str = ""  # the one added line


def _field(name: str, number: int, kind: int, **more: Any) -> FieldType:
    return FieldType(name=name, number=number, type=kind, label=FieldType.LABEL_OPTIONAL, **more)


def build_messages(*extra: FieldType, item_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """Compile ``t.Item`` / ``t.Attempt`` (plus ``extra`` fields on Item) into classes."""
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    file.enum_type.add(name="Color").value.extend(
        [
            descriptor_pb2.EnumValueDescriptorProto(name="COLOR_UNSPECIFIED", number=0),
            descriptor_pb2.EnumValueDescriptorProto(name="COLOR_RED", number=1),
        ]
    )
    attempt = file.message_type.add(name="Attempt")
    attempt.field.extend(
        [_field("at", 1, FieldType.TYPE_STRING), _field("status_code", 2, FieldType.TYPE_INT32)]
    )
    item = file.message_type.add(name="Item")
    entry = item.nested_type.add(name="TagsEntry")
    entry.options.map_entry = True
    entry.field.extend(
        [_field("key", 1, FieldType.TYPE_STRING), _field("value", 2, FieldType.TYPE_STRING)]
    )
    repeated = FieldType.LABEL_REPEATED
    fields = [
        _field("id", 1, FieldType.TYPE_UINT64),
        _field("name", 2, FieldType.TYPE_STRING),
        _field("color", 3, FieldType.TYPE_ENUM, type_name=".t.Color"),
        _field("amount", 4, FieldType.TYPE_INT64),
        _field("doubled", 5, FieldType.TYPE_INT64),
        _field("tags", 6, FieldType.TYPE_MESSAGE, type_name=".t.Item.TagsEntry"),
        _field("created_at", 7, FieldType.TYPE_STRING),
        _field("attempts", 8, FieldType.TYPE_MESSAGE, type_name=".t.Attempt"),
        _field("next_at", 9, FieldType.TYPE_STRING),
        *extra,
    ]
    fields[5].label = fields[7].label = repeated
    item.field.extend([f for f in fields if not item_fields or f.name in item_fields])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"t.{name}"))
        for name in ("Item", "Attempt")
    }


def sample(kind: type[Item] = Item, **changes: Any) -> Item:
    values: dict[str, Any] = {
        "id": 2**64 - 1,
        "name": "n",
        "color": Color.RED,
        "amount": 2**61,
        "tags": {"k": "v"},
        "created_at": AT,
        "secret": "s",
        "attempts": [Attempt(at=AT, status_code=503), Attempt(at=AT)],
    }
    return kind(**{**values, **changes})


def test_a_field_added_to_the_class_and_message_reaches_json_and_proto() -> None:
    note = _field("note", 10, FieldType.TYPE_STRING)
    messages = build_messages(note)
    wire_mapping(Attempt, messages["Attempt"])
    mapping = wire_mapping(ItemWithNote, messages["Item"])
    item = sample(ItemWithNote, note="hello")

    document = mapping.to_json(item)
    message = mapping.to_proto(item)

    assert document == {
        "id": 2**64 - 1,
        "name": "n",
        "color": 1,
        "amount": 2**61,
        "doubled": 2**62,
        "tags": {"k": "v"},
        "created_at": AT_TEXT,
        "attempts": [{"at": AT_TEXT, "status_code": 503}, {"at": AT_TEXT}],
        "note": "hello",
    }
    assert list(document) == [
        field.name for field in message.DESCRIPTOR.fields if field.name in document
    ]
    assert message.note == "hello" and message.id == 2**64 - 1 and message.color == 1
    assert message.attempts[0].status_code == 503 and dict(message.tags) == {"k": "v"}
    assert "secret" not in document


def test_without_the_message_field_the_new_field_stays_inside() -> None:
    messages = build_messages()
    wire_mapping(Attempt, messages["Attempt"])
    document = wire_mapping(ItemWithNote, messages["Item"]).to_json(sample(ItemWithNote, note="x"))
    assert "note" not in document


def test_zero_values_and_none_are_left_out() -> None:
    messages = build_messages()
    wire_mapping(Attempt, messages["Attempt"])
    mapping = wire_mapping(Item, messages["Item"])
    empty = sample(id=0, name="", color=Color.UNSPECIFIED, amount=0, tags={}, attempts=[])
    assert mapping.to_json(empty) == {"created_at": AT_TEXT}
    assert mapping.to_json(sample(next_at=AT))["next_at"] == AT_TEXT
    assert mapping.to_proto(empty).ListFields()[0][0].name == "created_at"


def test_a_message_field_without_an_entity_field_fails_at_once() -> None:
    messages = build_messages(_field("missing", 10, FieldType.TYPE_STRING))
    with pytest.raises(TypeError, match=r"Item\.missing has no field on Item"):
        wire_mapping(Item, messages["Item"])


def test_from_proto_reads_the_entity_back_by_field_name() -> None:
    @attrs.frozen
    class Flat:
        id: int = 0
        name: str = ""
        color: Color = Color.UNSPECIFIED
        tags: dict[str, str] = attrs.field(factory=dict)
        created_at: datetime | None = None
        local_only: str = "default"

    flat_fields = ("id", "name", "color", "tags", "created_at")
    messages = build_messages(item_fields=flat_fields)
    mapping = wire_mapping(Flat, messages["Item"])
    message: Message = messages["Item"](
        id=7, name="n", color=1, tags={"a": "b"}, created_at="2026-11-29T18:45:15Z"
    )
    flat = mapping.from_proto(message)
    assert flat == Flat(7, "n", Color.RED, {"a": "b"}, AT.replace(microsecond=0))
    assert type(flat.color) is Color
    assert mapping.to_proto(flat) == message
