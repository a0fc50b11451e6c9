"""`zbroker top`: a live terminal view of the broker, refreshed from its admin calls.

Every refresh asks the broker for QUEUES, WORKERS and STATS (the same figures
`zbroker queues`, `workers` and `status` print) and keeps a short history of
each service's depth, drawn as a sparkline, so a backlog building up or
draining shows at a glance. It shows the first TOP_SERVICES services by name
(one QUEUES page, so a refresh costs the broker the same with a hundred
thousand services as with ten); `zbroker queues` lists them all.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from zbroker.client import Client
from zbroker.client.errors import AuthenticationFailed, ClientError, Forbidden
from zbroker.client.keys import Credentials
from zbroker.protocol.states import TaskState

# The QUEUES fields shown: state counts, under the states' wire names.
READY, DELAYED, BLOCKED, INFLIGHT, DEAD = (
    TaskState.READY.value,
    TaskState.DELAYED.value,
    TaskState.BLOCKED.value,
    TaskState.INFLIGHT.value,
    TaskState.DEAD.value,
)

SPARKS = "▁▂▃▄▅▆▇█"
HISTORY = 60  # refreshes of depth history per service
TOP_SERVICES = 200  # services shown: one QUEUES page


def sparkline(values: list[int]) -> str:
    if not values:
        return ""
    top = max(values)
    if top == 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, v * (len(SPARKS) - 1) // top)] for v in values)


class Dashboard:
    """Holds the depth history between refreshes and renders one frame."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.depths: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=HISTORY))

    def frame(self, client: Client) -> Group:
        try:
            queues, more = client.queues_page(TOP_SERVICES)
            workers = client.workers()
            stats = client.broker_stats()
        except (AuthenticationFailed, Forbidden):
            raise  # waiting cannot mend it: the command ends with the reason
        except ClientError as exc:  # the broker away, say: shown until it is back
            return Group(Text(f"broker at {self.endpoint}: {exc}", style="bold red"))
        shown = {row["service"] for row in queues}
        for gone in [name for name in self.depths if name not in shown]:
            del self.depths[gone]  # history only for the services on screen
        for row in queues:
            self.depths[row["service"]].append(
                row[READY] + row[DELAYED] + row.get(BLOCKED, 0) + row["requests"]
            )
        table = self._queues(queues)
        if more is not None:
            table.caption = (
                f"the first {len(queues)} of {stats['services']} services: "
                "zbroker queues lists them all"
            )
        return Group(self._header(stats), table, self._workers(workers))

    def _header(self, stats: dict[str, Any]) -> Panel:
        counters = stats["stats"]
        journal = stats.get("journal") or {}
        malformed = sum(stats["malformed"].values())
        text = Text()
        text.append(f"{self.endpoint}", style="bold")
        text.append(f"   up {stats['uptime_s']:.0f}s   services {stats['services']}")
        text.append(f"   workers {stats['workers']}   waiting calls {stats['waiting_calls']}\n")
        text.append(
            f"tasks: {counters['tasks_enqueued']} enqueued, {counters['tasks_done']} done, "
            f"{counters['tasks_retried']} retried, {counters['tasks_dead']} dead   "
            f"requests: {counters['requests']} in, {counters['replies']} replied"
        )
        if malformed:
            text.append(f"   malformed dropped: {malformed}", style="yellow")
        schedules = stats.get("schedules") or {}
        if schedules.get("count"):
            upcoming = schedules.get("next_at")
            when = time.strftime("%H:%M:%S", time.localtime(upcoming)) if upcoming else "-"
            text.append(
                f"\nschedules {schedules['count']}: next firing at {when}, "
                f"{counters.get('schedules_fired', 0)} fired"
            )
            refused = counters.get("schedule_firings_refused", 0)
            if refused:
                text.append(f", {refused} refused (retried)", style="yellow")
        if journal:
            text.append(
                f"\njournal {journal['durability']}: {journal['commits']} commits, "
                f"{journal['bytes_used'] / 1048576:.1f} MiB"
            )
        return Panel(text, title="zbroker top", title_align="left")

    def _queues(self, queues: list[dict[str, Any]]) -> Table:
        table = Table(title="queues", title_justify="left", expand=True)
        for name, justify in [
            ("service", "left"),
            (READY, "right"),
            (DELAYED, "right"),
            (BLOCKED, "right"),
            ("unplaceable", "right"),
            (INFLIGHT, "right"),
            (DEAD, "right"),
            ("workers", "right"),
            ("credit", "right"),
            ("oldest", "right"),
            ("done/s", "right"),
            ("fail/s", "right"),
            ("wait p95", "right"),
            ("run p95", "right"),
            ("depth", "left"),
        ]:
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in queues:
            state = " (paused)" if row.get("paused") else ""
            table.add_row(
                row["service"] + state,
                str(row[READY] + row["requests"]),
                str(row[DELAYED]),
                str(row.get(BLOCKED, 0)),
                Text(
                    str(row.get("unplaceable", 0)), style="yellow" if row.get("unplaceable") else ""
                ),
                str(row[INFLIGHT]),
                Text(str(row[DEAD]), style="red" if row[DEAD] else ""),
                Text(str(row["workers"]), style="" if row["workers"] else "red"),
                f"{row['credit_in_use']}/{row['credit']}",
                f"{row['oldest_age_s']:.1f}s",
                f"{row['done_rate']:.1f}",
                f"{row['fail_rate']:.1f}",
                _seconds(row["wait_s_p95"]),
                _seconds(row["run_s_p95"]),
                sparkline(list(self.depths[row["service"]])),
            )
        return table

    def _workers(self, workers: list[dict[str, Any]]) -> Table:
        table = Table(title="workers", title_justify="left", expand=True)
        for name in ("worker", "service", "state", "held", "tags", "seen", "metrics"):
            table.add_column(name)
        for row in workers:
            seen = row["last_seen_s"]
            table.add_row(
                row["worker"],
                row["service"],
                row["state"],
                f"{len(row['tasks'])}/{row['credit']}",
                ", ".join(row.get("tags") or ()) or "-",
                Text(f"{seen:.1f}s ago", style="yellow" if seen > 5 else ""),
                ", ".join(f"{k}={v}" for k, v in row["metrics"].items()) or "-",
            )
        return table


def _warn(count: int) -> Text:
    """A count that is yellow when it is not 0 (tasks no worker can take)."""
    return Text(str(count), style="yellow" if count else "")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def run(
    endpoint: str, interval_s: float, once: bool, credentials: Credentials | None = None
) -> None:
    dashboard = Dashboard(endpoint)
    with Client(
        endpoint, timeout_s=max(1.0, interval_s), retries=0, credentials=credentials
    ) as client:
        if once:
            from rich.console import Console

            Console(width=160).print(dashboard.frame(client))
            return
        with Live(dashboard.frame(client), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(dashboard.frame(client))
