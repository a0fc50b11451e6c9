"""Wire protocols spoken on the broker's sockets: pure codecs, no I/O.

- `mdp`: 7/MDP (Majordomo) client and worker frames, 8/MMI constants.
- `ext`: ZBW01, zbroker's worker protocol (credit, acknowledgements, attempts).
- `zbc`: ZBC01, zbroker's client protocol for durable tasks.
- `events`: the envelope of topic events on the pub/sub bus.
- `limits`: every cap, batch size and range the protocols fix, each with its reason.
- `states`: task states as the wire names them (final, waiting, listable).
Importing this package never imports zmq or lmdb.
"""

from zbroker.protocol.errors import ProtocolError

# Well-known loopback endpoints used when nothing else is configured.
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # ROUTER: MDP clients and workers
DEFAULT_EVENTS_IN = "tcp://127.0.0.1:5556"  # XSUB: publishers connect here
DEFAULT_EVENTS_OUT = "tcp://127.0.0.1:5557"  # XPUB: subscribers connect here

__all__ = ["DEFAULT_ENDPOINT", "DEFAULT_EVENTS_IN", "DEFAULT_EVENTS_OUT", "ProtocolError"]
