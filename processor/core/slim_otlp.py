"""OTLP's trace schema with one change, made for extraction: span attributes as a map.

Extraction looks at a handful of a span's attributes (its kind, agent, token counts, ...) among
ten or more. Iterating OTLP's ``repeated KeyValue attributes`` builds a Python object per
attribute, and that loop was the largest share of a worker's CPU. Protobuf encodes a
``map<string, V>`` field exactly as a repeated message whose ``key`` is field 1 and ``value``
field 2, which is what ``KeyValue`` is; so this schema reads the same bytes with
``Span.attributes`` as a ``map<string, AnyValue>``, and a span's wanted attributes are looked
up in C. On a repeated key the map keeps the last value, as reading the list in order and
keeping the last does.

Everything else is OpenTelemetry's own ``trace.proto`` (from ``opentelemetry-proto``), copied
under another package: the same fields, so parsing checks a message exactly as the OTLP classes
do. ``Request`` is ``TracesData``, whose bytes are those of an ``ExportTraceServiceRequest``.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.proto.trace.v1 import trace_pb2

_OTLP_PACKAGE = trace_pb2.DESCRIPTOR.package  # opentelemetry.proto.trace.v1
_PACKAGE = "processor.slim_otlp.v1"


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto()
    trace_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = "processor/slim_otlp/v1/trace.proto"
    file.package = _PACKAGE
    file.ClearField("options")
    for message in file.message_type:
        _move_to_package(message)
        if message.name == "TracesData":  # nothing refers to it
            message.name = "Request"
    [span] = [message for message in file.message_type if message.name == "Span"]
    [attributes] = [field for field in span.field if field.name == "attributes"]
    entry = span.nested_type.add(name="AttributesEntry")
    entry.options.map_entry = True
    entry.field.add(
        name="key", number=1, type=attributes.TYPE_STRING, label=attributes.LABEL_OPTIONAL
    )
    entry.field.add(
        name="value",
        number=2,
        type=attributes.TYPE_MESSAGE,
        label=attributes.LABEL_OPTIONAL,
        type_name=".opentelemetry.proto.common.v1.AnyValue",
    )
    attributes.type_name = f".{_PACKAGE}.Span.AttributesEntry"
    return file


def _move_to_package(message: descriptor_pb2.DescriptorProto) -> None:
    """Point references to trace.proto's own types at their copies here."""
    for field in message.field:
        if field.type_name.startswith(f".{_OTLP_PACKAGE}."):
            field.type_name = f".{_PACKAGE}." + field.type_name[len(_OTLP_PACKAGE) + 2 :]
    for nested in message.nested_type:
        _move_to_package(nested)


_pool = descriptor_pool.Default()
_pool.Add(_file())

# Generated at import time, so typed loosely: the fields are trace.proto's.
SlimRequest: Any = message_factory.GetMessageClass(
    _pool.FindMessageTypeByName(f"{_PACKAGE}.Request")
)
