"""Workload "web": enqueue-to-done through `zbroker web`, over HTTP (keep-alive) and
over its WebSocket, next to the native asyncio client in the same rounds.

Per round, fresh processes on loopback TCP: a broker (`zbroker start`, durability
memory, so that what is measured is the hops and not the disk), one worker process
(zbroker's `Worker`, echoing its payload, concurrency CONCURRENCY) and a gateway
(`zbroker web`). This process is the caller, one asyncio loop, three ways to do the
same thing, which of them goes first rotating round by round:

- `native`: `AsyncClient.enqueue()` then `AsyncClient.result(id, timeout_s=10)`;
- `http`: `POST /api/v1/tasks` then `GET /api/v1/tasks/{id}/result?wait_s=10`, on
  one aiohttp session (keep-alive connections);
- `websocket`: the `enqueue` then the `result` request on one WebSocket.

Two phases per way: `sequential` (one task at a time: the latency of enqueue to
result, p50 and p95) and `concurrent` (IN_FLIGHT callers at once: tasks per second).
The gateway's and the broker's CPU per task come from /proc. Peers: this file,
`python bench/web.py worker ENDPOINT`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import (
    EN_DASH,
    ROOT,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    fmt_count,
    fmt_range,
    free_tcp_ports,
    percentile,
    process_cpu_s,
    python_argv,
    spread,
    wait_for_listener,
)

SCRIPT = Path(__file__).resolve()
SERVICE = "bench-web"
NATIVE, HTTP, WEBSOCKET = "native", "http", "websocket"
WAYS = (NATIVE, HTTP, WEBSOCKET)
SEQUENTIAL, CONCURRENT = "sequential", "concurrent"
CONCURRENCY = 32  # the worker's tasks at once
IN_FLIGHT = 16  # callers at once in the concurrent phase
PAYLOAD = "x" * 100
RESULT_WAIT_S = 10


@dataclass(frozen=True, slots=True)
class Settings:
    sequential_tasks: int
    concurrent_tasks: int
    warmup_tasks: int

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        return cls(200, 1_000, 50) if quick else cls(1_000, 5_000, 200)


# ------------------------------------------------------------------ the worker (own process)


def worker(endpoint: str) -> None:
    from zbroker.client import Worker

    def echo(task: Any) -> bytes:
        return bytes(task.payload)

    w = Worker(endpoint, SERVICE, echo, concurrency=CONCURRENCY)
    print("ready", flush=True)
    w.run()


# ------------------------------------------------------------------ the three ways


Call = Callable[[], Awaitable[None]]


class Ways:
    """One caller of each way, opened once per round."""

    def __init__(self, endpoint: str, web_url: str) -> None:
        self.endpoint = endpoint
        self.web_url = web_url

    async def __aenter__(self) -> Ways:
        import aiohttp

        from zbroker.client.aclient import AsyncClient

        self.client = AsyncClient(self.endpoint)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT * 2))
        self.ws = await self.session.ws_connect(f"{self.web_url}/ws")
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.ensure_future(self._read_ws())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.session.close()
        await self.client.aclose()

    async def native(self) -> None:
        task_id = await self.client.enqueue(SERVICE, PAYLOAD.encode())
        await self.client.result(task_id, timeout_s=RESULT_WAIT_S)

    async def http(self) -> None:
        url = f"{self.web_url}/api/v1/tasks"
        async with self.session.post(url, json={"service": SERVICE, "text": PAYLOAD}) as r:
            task_id = (await r.json())["id"]
        async with self.session.get(f"{url}/{task_id}/result?wait_s={RESULT_WAIT_S}") as r:
            if (await r.json()).get("state") != "done":
                raise RuntimeError(f"task {task_id} did not end in time")

    async def websocket(self) -> None:
        enqueued = await self._ws_call(op="enqueue", service=SERVICE, text=PAYLOAD)
        task_id = enqueued["result"]["id"]
        done = await self._ws_call(op="result", task=task_id, wait_s=RESULT_WAIT_S)
        if done["result"].get("state") != "done":
            raise RuntimeError(f"task {task_id} did not end in time")

    async def _ws_call(self, **message: Any) -> dict[str, Any]:
        self._ids += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._ids] = future
        await self.ws.send_json({"id": self._ids, **message})
        return await future

    async def _read_ws(self) -> None:
        async for msg in self.ws:
            answer = msg.json()
            future = self._waiting.pop(answer.get("id"), None)
            if future is not None:
                future.set_result(answer)


async def sequential(call: Call, tasks: int) -> list[float]:
    """Latencies (ms) of `tasks` calls one after the other."""
    out = []
    for _ in range(tasks):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def concurrent(call: Call, tasks: int) -> float:
    """Tasks per second with IN_FLIGHT callers taking tasks until `tasks` are done."""
    left = tasks

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return tasks / (time.perf_counter() - started)


def cpu_s(pid: int) -> float:
    return process_cpu_s(pid) or 0.0


async def measure_round(
    ways: Ways, order: list[str], settings: Settings, pids: dict[str, int], say: Say
) -> JSONDict:
    out: JSONDict = {}
    for way in order:
        call: Call = getattr(ways, way)
        await sequential(call, settings.warmup_tasks)
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        latencies = sorted(await sequential(call, settings.sequential_tasks))
        rate = await concurrent(call, settings.concurrent_tasks)
        tasks = settings.sequential_tasks + settings.concurrent_tasks
        used = {
            f"{n}_cpu_us_per_task": (cpu_s(p) - before[n]) / tasks * 1e6 for n, p in pids.items()
        }
        out[way] = {
            "p50_ms": statistics.median(latencies),
            "p95_ms": percentile(latencies, 95),
            "tasks_per_s": rate,
            **used,
        }
        say(
            f"  {way:<9} p50 {out[way]['p50_ms']:.2f} ms  p95 {out[way]['p95_ms']:.2f} ms  "
            f"{fmt_count(rate)} tasks/s with {IN_FLIGHT} in flight"
        )
    return out


def run_round(options: Options, settings: Settings, index: int, say: Say) -> JSONDict:
    broker_port, events_in, events_out, web_port = free_tcp_ports(4)
    endpoint = f"tcp://127.0.0.1:{broker_port}"
    with ProcessGroup(options.log_dir / f"web-{index}") as procs:
        data = options.log_dir / f"web-{index}" / "data"
        broker = procs.start(
            "broker",
            [
                sys.executable, "-m", "zbroker", "start",
                "--bind", endpoint,
                "--events-in", f"tcp://127.0.0.1:{events_in}",
                "--events-out", f"tcp://127.0.0.1:{events_out}",
                "--durability", "memory",
                "--data-dir", str(data),
            ],
        )  # fmt: skip
        wait_for_listener(broker_port, broker)
        gateway = procs.start(
            "gateway",
            [
                sys.executable, "-m", "zbroker", "web",
                "--listen", f"127.0.0.1:{web_port}",
                "--endpoint", endpoint,
                "--events-in", f"tcp://127.0.0.1:{events_in}",
                "--events-out", f"tcp://127.0.0.1:{events_out}",
            ],
        )  # fmt: skip
        wait_for_listener(web_port, gateway)
        peer = procs.start("worker", python_argv(SCRIPT, "worker", endpoint), stdout_pipe=True)
        if peer.read_line(30) != "ready":
            raise peer.failure("did not start")
        order = list(WAYS[index % 3 :] + WAYS[: index % 3])
        pids = {"broker": broker.pid, "gateway": gateway.pid}

        async def main() -> JSONDict:
            async with Ways(endpoint, f"http://127.0.0.1:{web_port}") as ways:
                return await measure_round(ways, order, settings, pids, say)

        result = asyncio.run(main())
        procs.check_alive()
        return result


def run(options: Options, say: Say) -> JSONDict:
    settings = Settings.for_mode(options.quick)
    rounds = []
    for index in range(options.runs):
        say(f"round {index + 1}/{options.runs}")
        rounds.append(run_round(options, settings, index, say))
    summary: JSONDict = {}
    for way in WAYS:
        summary[way] = {
            metric: spread([r[way][metric] for r in rounds]) for metric in rounds[0][way]
        }
    ratios: JSONDict = {}
    for way in (HTTP, WEBSOCKET):
        ratios[way] = {
            "p50_ms": summary[way]["p50_ms"]["median"] / summary[NATIVE]["p50_ms"]["median"],
            "tasks_per_s": summary[way]["tasks_per_s"]["median"]
            / summary[NATIVE]["tasks_per_s"]["median"],
        }
    return {
        "settings": {**asdict(settings), "in_flight": IN_FLIGHT, "worker_concurrency": CONCURRENCY},
        "rounds": rounds,
        "summary": summary,
        "ratios_to_native": ratios,
    }


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _times(value: float) -> str:
    return f"x{value:.2f}"


def markdown(result: JSONDict) -> str:
    s = result["settings"]
    lines = [
        f"Enqueue to result through `zbroker web` and natively, {len(result['rounds'])} rounds "
        f"(fresh broker, durability memory, gateway and worker per round; the way going first "
        f"rotating), median (min{EN_DASH}max) over rounds. Sequential: "
        f"{fmt_count(s['sequential_tasks'])} tasks one at a time (after "
        f"{fmt_count(s['warmup_tasks'])} untimed); concurrent: {fmt_count(s['concurrent_tasks'])} "
        f"tasks, {s['in_flight']} in flight; one worker with concurrency "
        f"{s['worker_concurrency']}. Each task is two calls: enqueue, then result (waited for).",
        "",
        "| Way | p50 ms | p95 ms | tasks/s | gateway CPU µs/task | broker CPU µs/task |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for way, row in result["summary"].items():
        lines.append(
            f"| {way} | {fmt_range(row['p50_ms'], _ms)} | {fmt_range(row['p95_ms'], _ms)} | "
            f"{fmt_range(row['tasks_per_s'], fmt_count)} | "
            f"{fmt_range(row['gateway_cpu_us_per_task'], fmt_count)} | "
            f"{fmt_range(row['broker_cpu_us_per_task'], fmt_count)} |"
        )
    lines.append("")
    for way, r in result["ratios_to_native"].items():
        by_round = {
            metric: spread([row[way][metric] / row[NATIVE][metric] for row in result["rounds"]])
            for metric in ("p50_ms", "tasks_per_s")
        }
        lines.append(
            f"- {way} / native, of the medians: p50 latency x{r['p50_ms']:.2f}, throughput "
            f"x{r['tasks_per_s']:.2f}; round by round: p50 "
            f"{fmt_range(by_round['p50_ms'], _times)}, "
            f"throughput {fmt_range(by_round['tasks_per_s'], _times)}"
        )
    return "\n".join(lines)


WORKLOAD = Workload(
    "web",
    "enqueue to result over HTTP and WebSocket (zbroker web) vs the native client",
    run,
    markdown,
)

if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[2])
