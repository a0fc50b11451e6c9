"""What a burst of large messages makes a broker hold: its peak RSS while peers each
send one message between `--max-message-bytes` and the frame cap (read whole by
libzmq, then refused as too large), round after round.

    .venv/bin/python bench/big_messages.py [--peers 12] [--mib 60] [--frames 1] [--rounds 3]

docs/security.md ("Not defended yet") quotes it: libzmq's high-water marks count
messages, so what it holds for a burst is peers x message size, whatever the
broker does with them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq
from harness import free_tcp_ports

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--mib", type=int, default=60, help="size of each message (MiB)")
    parser.add_argument(
        "--frames", type=int, default=1, help="frames of --mib each in every message"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ports = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{ports[0]}"
    with tempfile.TemporaryDirectory(prefix="zbroker-big-") as tmp:
        broker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zbroker",
                "start",
                "--bind",
                endpoint,
                "--events-in",
                f"tcp://127.0.0.1:{ports[1]}",
                "--events-out",
                f"tcp://127.0.0.1:{ports[2]}",
                "--data-dir",
                str(Path(tmp) / "data"),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
        )
        try:
            time.sleep(1.5)
            idle = rss_mib(broker.pid)
            peak = idle
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_mib(broker.pid))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            ctx = zmq.Context()
            peers = []
            for _ in range(args.peers):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.connect(endpoint)
                peers.append(sock)
            body = b"x" * (args.mib << 20)
            for n in range(args.rounds):
                for sock in peers:
                    sock.send_multipart([b"", b"MDPC01", b"svc", *[body] * args.frames], copy=False)
                time.sleep(2.0)
                print(f"[big_messages] round {n + 1}/{args.rounds}: peak {peak} MiB", flush=True)
            done.set()
            sampler.join()
            alive = broker.poll() is None
            print(
                f"{args.peers} peers x {args.frames} frames x {args.mib} MiB x {args.rounds}"
                " rounds: broker RSS"
                f" {idle} MiB idle, {peak} MiB peak; still running: {alive}"
            )
            for sock in peers:
                sock.close()
            ctx.term()
        finally:
            broker.terminate()
            broker.wait(30)


if __name__ == "__main__":
    main()
