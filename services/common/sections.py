"""Config sections on the wire: a pydantic section <-> its proto message (protos/reinstruct/v1/config.proto).

A stage's request carries its section whole. The client sends every field of its own section
(`to_message`); the replica rebuilds the section from what was set (`from_message`): a field left
unset takes the section's default, the one place defaults live, and the same pydantic class checks
every value, so a bad one is INVALID_ARGUMENT naming its field (`filter.rouge_l_threshold`). Nothing
is merged with the replica's own config.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from ..api import config_pb2
from .config import FilterConfig, LoraConfig, TrainingConfig
from .validation import RequestError

# Every section that travels, with its message (tests/test_config_messages.py checks each pair).
MESSAGES: dict[type[BaseModel], type[Message]] = {
    FilterConfig: config_pb2.FilterConfig,
    LoraConfig: config_pb2.LoraConfig,
    TrainingConfig: config_pb2.TrainingConfig,
}


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def to_message(section: BaseModel) -> Message:
    """The section with every field set, as its message."""
    message = MESSAGES[type(section)]()
    for name, field in message.DESCRIPTOR.fields_by_name.items():
        value = getattr(section, name)
        if value is None:
            continue  # unset: the section's default is None
        if _is_map(field):
            getattr(message, name).update(value)
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(to_message(value))
        elif _is_repeated(field):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def _given(message: Message) -> dict:
    """The fields the client set, as the section's field names and plain values."""
    given = {}
    for name, field in message.DESCRIPTOR.fields_by_name.items():
        value = getattr(message, name)
        if _is_map(field) or _is_repeated(field):
            if len(value):
                given[name] = dict(value) if _is_map(field) else list(value)
        elif field.message_type is not None:
            if message.HasField(name):
                given[name] = _given(value)
        elif message.HasField(name):
            given[name] = value
    return given


def from_message(message: Message, section_type: type[BaseModel], field: str) -> BaseModel:
    """The section a request carries in `field`: what it set, the section's defaults for the rest."""
    try:
        return section_type.model_validate(_given(message))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join([field, *(str(part) for part in error["loc"])])
        raise RequestError(where, error["msg"].removeprefix("Value error, ")) from None
