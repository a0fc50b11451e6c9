"""A worker process for recovery tests: serves a service and logs what it does.

    python -m tests.recovery.task_worker ENDPOINT SERVICE LOGFILE [CONCURRENCY]

With ZBROKER_SERVER_KEY and ZBROKER_KEY set it connects with those CURVE keys.
Each task appends "start <id> <attempt> <payload> <time>" when its handler
begins and "done <id> <attempt> <payload> <time>" just before it returns. Payloads steer it:
`sleep:<seconds>` sleeps first, `poison` always raises.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from zbroker import Credentials, Task, Worker


def main() -> None:
    endpoint, service, log_path = sys.argv[1:4]
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def write(line: str) -> None:
        with lock:
            log.write(line + "\n")
            log.flush()
            os.fsync(log.fileno())

    def handle(task: Task) -> bytes:
        payload = task.payload.decode()
        write(f"start {task.id} {task.attempt} {payload} {time.time():.6f}")
        if payload.startswith("sleep:"):
            time.sleep(float(payload.split(":", 1)[1]))
        if payload == "poison":
            raise RuntimeError("poison task")
        write(f"done {task.id} {task.attempt} {payload} {time.time():.6f}")
        return payload.upper().encode()

    worker = Worker(
        endpoint,
        service,
        handle,
        concurrency=concurrency,
        heartbeat_interval_s=0.2,
        max_reconnect_delay_s=0.5,
        # A broker with --auth: the test gives the keys in ZBROKER_SERVER_KEY, ZBROKER_KEY.
        credentials=Credentials.from_environment(),
    )
    signal.signal(signal.SIGTERM, lambda *_: worker.stop(5.0))
    worker.run()


if __name__ == "__main__":
    main()
