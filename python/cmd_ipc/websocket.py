"""WebSocket for cmd-ipc, by its former path: kept so that existing imports work.

The channels (client, and the server's end of a connection) live in
:mod:`cmd_ipc.channels.websocket`, the server in :mod:`cmd_ipc.server.websocket`; import from
there in new code.
"""

from cmd_ipc.channels.websocket import (
    CLOSE_REPLACED,
    DEFAULT_MAX_SIZE,
    DEFAULT_SEND_LIMIT,
    ID_HEADER,
    WebSocketChannel,
    WebSocketServerChannel,
)

# Private, but tests of the old path reach it here.
from cmd_ipc.channels.websocket import _WebSocketBase as _WebSocketBase
from cmd_ipc.server.websocket import WebSocketHandler, WebSocketServer, serve_websocket

__all__ = [
    "CLOSE_REPLACED",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_SEND_LIMIT",
    "ID_HEADER",
    "WebSocketChannel",
    "WebSocketHandler",
    "WebSocketServer",
    "WebSocketServerChannel",
    "serve_websocket",
]
