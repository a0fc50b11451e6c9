"""TaskOptions, the value form of the task-option keywords, and the two clients' surfaces.

No broker needed: a TaskOptions is checked when it is made, and the rule for
options given both ways is decided before anything is sent (the fake-broker
tests in test_client_zbc.py show the wire; tests/integration the real broker).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from datetime import UTC, datetime
from typing import Any

import pytest

import zbroker
from zbroker.client import AsyncClient, Client, TaskOptions
from zbroker.client.options import pick_options


def test_a_value_is_frozen_compared_by_fields_and_made_with_keywords_only() -> None:
    options = TaskOptions(priority=3, headers={"a": 1})
    assert options == TaskOptions(priority=3, headers={"a": 1}) != TaskOptions(priority=3)
    assert hash(options) == hash(TaskOptions(priority=3, headers={"a": 2}))  # headers not hashed
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.priority = 4  # type: ignore[misc]
    assert not hasattr(options, "__dict__")  # slots
    with pytest.raises(TypeError):
        TaskOptions(3)  # type: ignore[call-arg]
    assert dataclasses.replace(options, priority=4).priority == 4
    assert zbroker.TaskOptions is TaskOptions


def test_the_value_keeps_its_own_copy_of_the_headers() -> None:
    headers = {"voice": "de"}
    options = TaskOptions(headers=headers)
    headers["voice"] = "en"
    assert options.headers == {"voice": "de"}


def test_not_before_may_be_a_datetime_or_seconds_since_the_epoch() -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert TaskOptions(not_before=when).not_before_s == when.timestamp()
    assert TaskOptions(not_before=1.5).not_before_s == 1.5
    assert TaskOptions().not_before_s is None


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"priority": 128}, ValueError),
        ({"priority": -129}, ValueError),
        ({"priority": "1"}, TypeError),
        ({"priority": True}, TypeError),
        ({"delay_s": 1, "not_before": 2.0}, ValueError),
        ({"delay_s": math.nan}, ValueError),
        ({"delay_s": "1"}, TypeError),
        ({"not_before": "tomorrow"}, TypeError),
        ({"ttl_s": -1}, ValueError),
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": 1.5}, ValueError),
        ({"timeout_s": 0}, ValueError),
        ({"timeout_s": math.inf}, ValueError),
        ({"key": ""}, ValueError),
        ({"key": 7}, ValueError),
        ({"headers": [("a", 1)]}, TypeError),
    ],
)
def test_a_bad_value_is_refused_when_made(fields: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        TaskOptions(**fields)


def test_the_options_of_a_call_come_from_one_place() -> None:
    value = TaskOptions(priority=5)
    # Keywords only, or the value only (keywords at their defaults are not "given")
    assert pick_options(None, TaskOptions(ttl_s=3)) == TaskOptions(ttl_s=3)
    assert pick_options(value, TaskOptions()) is value
    # Both: TypeError naming the keywords, as the call calls them
    with pytest.raises(TypeError, match=r"not both \(also given: ttl_s, headers\)"):
        pick_options(value, TaskOptions(ttl_s=3, headers={}))
    with pytest.raises(TypeError, match=r"also given: task_timeout_s\)"):
        pick_options(value, TaskOptions(timeout_s=1), timeout_name="task_timeout_s")
    with pytest.raises(TypeError, match="must be a TaskOptions"):
        pick_options({"priority": 5}, TaskOptions())  # type: ignore[arg-type]


def public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_the_generated_client_has_every_call_of_the_async_one_with_its_signature() -> None:
    # The lifecycle differs by design: the asyncio client also has aclose() and async with
    asynchronous = public_methods(AsyncClient)
    blocking = public_methods(Client)
    assert set(asynchronous) - set(blocking) == {"aclose"}
    assert set(blocking) - set(asynchronous) == {"mdp_request", "mdp_request_frames", "mmi_service"}
    for name, method in asynchronous.items():
        if name in ("aclose", "close"):
            continue
        a, b = inspect.signature(method), inspect.signature(blocking[name])
        if name in ("stream", "read_stream"):
            # Not coroutines: they return a stream at once (an async iterator in the
            # asyncio client), which sends nothing until it is read.
            assert not inspect.iscoroutinefunction(method), name
            assert a.return_annotation == "_base.AsyncTaskStream", name
            assert b.return_annotation == "_base.TaskStream", name
        else:
            assert inspect.iscoroutinefunction(method), name
            assert a.return_annotation == b.return_annotation, name
        assert not inspect.iscoroutinefunction(blocking[name]), name
        assert a.parameters.keys() == b.parameters.keys(), name
        assert method.__doc__ == blocking[name].__doc__, name
    assert "options" in inspect.signature(Client.enqueue).parameters
    assert inspect.signature(Client.__init__).parameters.keys() == (
        inspect.signature(AsyncClient.__init__).parameters.keys()
    )
