"""Conversions between Python values and the protocol's well-known types, in one place.

Payloads and results travel as ``google.protobuf.Any`` under the type URL
``type.googleapis.com/<full name>``, the form every protobuf runtime (and the Rust SDK's prost)
writes and checks, so a Python producer's job decodes in a Rust worker and the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any as AnyValue
from typing import TypeVar

from google.protobuf import any_pb2, descriptor_pool, duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from jobwire.errors import DecodeError

M = TypeVar("M", bound=Message)

TYPE_URL_PREFIX = "type.googleapis.com/"


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, type_url_prefix=TYPE_URL_PREFIX)
    return packed


def unpack(packed: any_pb2.Any, cls: type[M], what: str) -> M:
    """Decodes ``packed`` as ``cls``, refusing another type URL: bytes of one message often
    parse as another without error, so the name is the only safe check."""
    expected = cls.DESCRIPTOR.full_name
    if packed.TypeName() != expected:
        raise DecodeError(f"the {what} is a {packed.TypeName() or '(no type)'}, not a {expected}")
    message = cls()
    try:
        message.ParseFromString(packed.value)
    except ProtobufDecodeError as error:
        raise DecodeError(f"the {what} does not decode as a {expected}: {error}") from error
    return message


def unpack_known(packed: any_pb2.Any, what: str) -> Message:
    """Decodes ``packed`` as whatever message its type URL names, when this process has that
    message's generated module imported; else returns the ``Any`` itself."""
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(packed.TypeName())
    except KeyError:
        return packed
    return unpack(packed, GetMessageClass(descriptor), what)


def to_duration(value: timedelta | float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value if isinstance(value, timedelta) else timedelta(seconds=value))
    return duration


def from_duration(duration: duration_pb2.Duration) -> timedelta:
    return timedelta(seconds=duration.seconds, microseconds=duration.nanos // 1000)


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:
        raise ValueError("a naive datetime has no fixed time: give it a tzinfo")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value.astimezone(timezone.utc))
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=timezone.utc)


def to_struct(value: Mapping[str, AnyValue]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(value))
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, AnyValue]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(struct)
