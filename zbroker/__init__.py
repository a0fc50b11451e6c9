"""zbroker: a ZeroMQ task broker for local services.

Majordomo (7/MDP) request/reply with pushed work and heartbeats, a topic event
bus, and (coming) durable task queues. See docs/ for the protocol and design.
"""

__version__ = "0.1.0"
