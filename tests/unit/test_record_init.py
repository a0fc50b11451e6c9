"""TaskRecord's __init__ is written out (a compiled class would keep the generated one
interpreted): it must take exactly the fields dataclasses would, in their order, with
their defaults, and fresh mutable defaults per record."""

from __future__ import annotations

import dataclasses
import inspect

from tests.builds import signature_only
from zbroker.journal.base import TaskRecord, TaskState


@signature_only
def test_parameters_are_the_init_fields_in_order() -> None:
    fields = [f.name for f in dataclasses.fields(TaskRecord) if f.init]
    parameters = list(inspect.signature(TaskRecord.__init__).parameters)[1:]
    assert parameters == fields


def test_every_init_field_is_taken_by_name() -> None:
    # On both builds: each field given by keyword lands in its attribute.
    record = TaskRecord(
        id="t",
        service="svc",
        state=TaskState.DONE,
        seq=7,
        created_at=1.5,
        **{
            f.name: getattr(TaskRecord("x", "s", TaskState.READY, 1, 0.0), f.name)
            for f in dataclasses.fields(TaskRecord)
            if f.init and f.name not in {"id", "service", "state", "seq", "created_at"}
        },
    )
    assert (record.id, record.service, record.state, record.seq) == ("t", "svc", TaskState.DONE, 7)


def test_defaults_are_the_fields_defaults() -> None:
    record = TaskRecord("t", "svc", TaskState.READY, 1, 0.0)
    for field in dataclasses.fields(TaskRecord):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            assert getattr(record, field.name) == field.default, field.name
        elif field.default_factory is not dataclasses.MISSING:
            assert getattr(record, field.name) == field.default_factory(), field.name


def test_fields_not_in_init_start_empty() -> None:
    record = TaskRecord("t", "svc", TaskState.READY, 1, 0.0)
    assert record.store_memo is None
    assert record.frames_memo is None


def test_mutable_defaults_are_not_shared() -> None:
    one = TaskRecord("a", "svc", TaskState.READY, 1, 0.0)
    two = TaskRecord("b", "svc", TaskState.READY, 2, 0.0)
    one.headers["x"] = 1
    one.history.append(["made", 0.0])
    assert two.headers == {}
    assert two.history == []


def test_replace_and_equality_still_work() -> None:
    record = TaskRecord("t", "svc", TaskState.READY, 1, 0.0, headers={"h": 1})
    copy = dataclasses.replace(record, attempt=2)
    assert copy.attempt == 2
    assert copy.headers == {"h": 1}
    assert dataclasses.replace(copy, attempt=0) == record
