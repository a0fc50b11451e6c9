"""What a pass of the core produces, and the lifecycle events it publishes.

`Outputs` holds the pass's two products: the messages to send (`outbox`) and the
lifecycle events for the bus (`events`); the runtime takes both after the
journal commit. `EventSink` decides which events are wanted (only topics some
subscriber holds a prefix of) and groups them into batches. Neither sends
anything or reads a clock.
"""

from __future__ import annotations

from typing import Any

from zbroker.protocol.limits import MAX_BATCH_EVENTS

# Topics whose "is it wanted?" answer is kept, at most: a peer's service names are
# unbounded, the cache is not.
_TOPICS_CACHED = 10_000

# An entry of Outputs.events: (topic, fields, items). Consecutive events of one topic
# share an entry (at most MAX_BATCH_EVENTS), published as one message after the pass's
# commit. task.enqueued/started/done items are rows, a tuple per event in the order
# of `fields` (no map per event; docs/protocol.md §6); other topics' items are payload
# maps and `fields` is None.
EventEntry = tuple[str, tuple[str, ...] | None, list[Any]]


class Outputs:
    """The messages and events of the current pass, in the order they happened."""

    __slots__ = ("events", "outbox")

    def __init__(self) -> None:
        # Complete multipart messages; each one's first frame is its routing id.
        self.outbox: list[list[bytes]] = []
        self.events: list[EventEntry] = []


class EventSink:
    """Lifecycle events: which topics are wanted, and the entries they go into."""

    __slots__ = ("_out", "_wanted", "done_topics", "prefixes", "started_topics")

    def __init__(self, out: Outputs) -> None:
        self._out = out
        # The topic prefixes subscribers hold now (empty: no event is built at all).
        self.prefixes: frozenset[str] = frozenset()
        self._wanted: dict[str, bool] = {}
        # Service -> its task.started / task.done topic if wanted, else None.
        self.started_topics: dict[str, str | None] = {}
        self.done_topics: dict[str, str | None] = {}

    def set_subscriptions(self, prefixes: frozenset[str]) -> None:
        """The topic prefixes subscribers of the bus hold now (the runtime tracks them)."""
        self.prefixes = prefixes
        self._wanted = {}
        self.started_topics = {}
        self.done_topics = {}

    def wants(self, topic: str) -> bool:
        """Whether a subscriber holds a prefix of `topic` (the answer cached per topic).
        Asked before an event's payload is made: a subscriber to `task.done.tts` costs
        nothing for the other topics."""
        wanted = self._wanted.get(topic)
        if wanted is None:
            if len(self._wanted) >= _TOPICS_CACHED:
                self._wanted = {}
            wanted = self._wanted[topic] = any(topic.startswith(p) for p in self.prefixes)
        return wanted

    def task_topic(self, topics: dict[str, str | None], kind: str, service: str) -> str | None:
        """`kind` + `service` if a subscriber wants it, else None, kept in `topics` (the
        task.started and task.done sites look there first: the topic's string is made
        and hashed once per service, not per event)."""
        topic = kind + service
        wanted = topic if self.wants(topic) else None
        if len(topics) >= _TOPICS_CACHED:
            topics.clear()
        topics[service] = wanted
        return wanted

    def emit(self, topic: str, payload: dict[str, Any]) -> None:
        """One event with a payload map, if its topic is wanted."""
        if self.wants(topic):
            self.add(topic, None, [payload])

    def add(self, topic: str, fields: tuple[str, ...] | None, items: list[Any]) -> None:
        """Add events of one wanted topic in a row (the caller asked `wants`): rows of
        `fields`, or payloads when `fields` is None. Consecutive events with one topic
        share an entry, at most MAX_BATCH_EVENTS: the runtime publishes each entry as
        one batch message (docs/protocol.md §6), in this order."""
        if not items:
            return  # an entry is never empty: a batch holds at least one event
        events = self._out.events
        if events and events[-1][0] == topic:
            group = events[-1][2]
        else:
            group = []
            events.append((topic, fields, group))
        done, count = 0, len(items)
        while done < count:
            room = MAX_BATCH_EVENTS - len(group)
            if room <= 0:
                group = []
                events.append((topic, fields, group))
                room = MAX_BATCH_EVENTS
            group.extend(items[done : done + room])
            done += room
