"""The pool-worker wire protocol, sans I/O: bytes in, typed events out.

``framing`` turns bytes into bounded lines and strict JSON; ``messages`` holds
the typed requests and responses both ends encode and decode; ``client`` and
``worker`` are the connection state machines of the two roles. Nothing in this package touches
a socket, an event loop or IPython.
"""

from __future__ import annotations

from . import framing, messages
from .client import ClientConnection
from .framing import *  # noqa: F403
from .messages import *  # noqa: F403

__all__ = ["ClientConnection"]
__all__ += framing.__all__
__all__ += messages.__all__
