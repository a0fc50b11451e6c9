"""The I/O shell around the core: sockets, the event loop, the event proxy, signals.

The only package that imports `zmq` on the broker side.
"""

from zbroker.runtime.errors import BindError, RuntimeShellError
from zbroker.runtime.server import BrokerServer

__all__ = ["BindError", "BrokerServer", "RuntimeShellError"]
