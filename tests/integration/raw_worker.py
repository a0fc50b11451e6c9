"""A 7/MDP worker on raw pyzmq frames, run as its own process so tests can SIGKILL it.

usage: raw_worker.py ENDPOINT SERVICE MODE   (MODE: echo | hold)
  echo: reply b"echo:" + body to every request
  hold: take the first request, print HOLDING and keep heartbeating without replying
It prints READY once registered so the test knows when to go on.
"""

import sys
import time

import zmq

endpoint, service, mode = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.linger = 0
sock.connect(endpoint)
sock.send_multipart([b"", b"MDPW01", b"\x01", service])
print("READY", flush=True)
next_heartbeat = time.monotonic()
while True:
    if time.monotonic() >= next_heartbeat:
        sock.send_multipart([b"", b"MDPW01", b"\x04"])
        next_heartbeat = time.monotonic() + 0.1
    if not sock.poll(50):
        continue
    frames = sock.recv_multipart()
    if frames[2] != b"\x02":
        continue
    client, body = frames[3], frames[5:]
    if mode == "hold":
        print("HOLDING", body[0].decode(), flush=True)
        continue
    sock.send_multipart([b"", b"MDPW01", b"\x03", client, b"", b"echo:" + b"".join(body)])
