"""Config sections on the wire (protos/reinstruct/v1/config.proto <-> services/common/config.py)."""

import typing

import pytest
from google.protobuf.descriptor import FieldDescriptor
from pydantic import BaseModel

from services.api import config_pb2
from services.common.config import FilterConfig, LoraConfig, TrainingConfig
from services.common.sections import MESSAGES, from_message, to_message
from services.common.validation import RequestError

_SCALARS = {
    bool: {FieldDescriptor.TYPE_BOOL},
    int: {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64},
    float: {FieldDescriptor.TYPE_DOUBLE},  # never float32: 0.7 would arrive as 0.699999988
    str: {FieldDescriptor.TYPE_STRING},
}


def _wire_kind(annotation) -> str:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"message {annotation.__name__}"
    origin = typing.get_origin(annotation)
    if origin is dict:
        return "map"
    if origin is list:
        return "repeated"
    if origin is typing.Literal:
        return "scalar str"
    return f"scalar {annotation.__name__}"


def _proto_kind(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return "map"
    if field.message_type is not None:
        return f"message {field.message_type.name}"
    if field.is_repeated:
        return "repeated"
    return next(f"scalar {t.__name__}" for t, kinds in _SCALARS.items() if field.type in kinds)


@pytest.mark.parametrize("section", list(MESSAGES), ids=lambda s: s.__name__)
def test_each_message_mirrors_its_section_field_for_field(section):
    message = MESSAGES[section]
    fields = message.DESCRIPTOR.fields_by_name
    assert message.DESCRIPTOR.name == section.__name__
    assert set(fields) == set(section.model_fields), "config.proto and config.py name different fields"
    for name, info in section.model_fields.items():
        assert _proto_kind(fields[name]) == _wire_kind(info.annotation), name
        if _proto_kind(fields[name]).startswith("scalar"):
            assert fields[name].has_presence, f"{name} must be `optional`: unset has to differ from 0 and false"


def test_drift_is_caught():
    """A section field the message lacks fails the check above (here: a copy with one more field)."""

    class Wider(FilterConfig):
        new_rule: bool = True

    assert set(Wider.model_fields) != set(config_pb2.FilterConfig.DESCRIPTOR.fields_by_name)


def _changed_from_defaults() -> list[BaseModel]:
    return [
        FilterConfig(
            rouge_l_threshold=0.55,
            reject_only_above_threshold=True,
            min_instruction_words=2,
            max_instruction_words=40,
            near_duplicate_threshold=0.0,
            near_duplicate_min_tokens=3,
            decontamination_ngram=8,
            min_curation_score=3.5,
            max_instances_per_task=0,
            instruction_rules=False,
        ),
        TrainingConfig(
            epochs=7,
            max_steps=0,
            learning_rate=3e-5,
            use_gpu=True,
            strategy="fsdp",
            worker_resources={"training": 1.0},
            packing=False,
            precision="bf16",
            lora=LoraConfig(enabled=True, r=4, dropout=0.0),
            fewshot_fraction=0.25,
            stall_timeout_s=12.5,
        ),
    ]


@pytest.mark.parametrize("section", _changed_from_defaults(), ids=lambda s: type(s).__name__)
def test_a_section_arrives_as_it_was_sent(section):
    wire = type(to_message(section))()
    wire.ParseFromString(to_message(section).SerializeToString())
    assert from_message(wire, type(section), "x") == section
    assert from_message(to_message(type(section)()), type(section), "x") == type(section)()


def test_unset_fields_take_the_sections_defaults_zero_and_false_do_not():
    sent = config_pb2.TrainingConfig(epochs=5, max_steps=0, use_gpu=False, lora=config_pb2.LoraConfig(dropout=0.0))
    got = from_message(sent, TrainingConfig, "training")
    default = TrainingConfig()
    assert (got.epochs, got.max_steps, got.use_gpu, got.lora.dropout) == (5, 0, False, 0.0)
    assert (
        got.model_copy(update={"epochs": default.epochs, "lora": default.lora.model_copy(update={"dropout": 0.05})})
        == default
    )
    assert from_message(config_pb2.FilterConfig(), FilterConfig, "filter") == FilterConfig()


@pytest.mark.parametrize(
    "message, section, field",
    [
        (config_pb2.FilterConfig(rouge_l_threshold=1.5), FilterConfig, "filter.rouge_l_threshold"),
        (config_pb2.FilterConfig(min_instruction_words=9, max_instruction_words=3), FilterConfig, "filter"),
        (config_pb2.TrainingConfig(precision="fp8"), TrainingConfig, "training.precision"),
        (config_pb2.TrainingConfig(lora=config_pb2.LoraConfig(dropout=1.0)), TrainingConfig, "training.lora.dropout"),
        (config_pb2.TrainingConfig(epochs=0), TrainingConfig, "training.epochs"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(message, section, field):
    with pytest.raises(RequestError) as refused:
        from_message(message, section, field.split(".")[0])
    assert refused.value.field == field
