"""Servers: expose a registry to remote clients.

* :mod:`cmd_ipc.server.http`: an aiohttp endpoint (``create_app``, ``add_routes``,
  ``serve``) for :class:`~cmd_ipc.HTTPChannel` clients (needs ``cmd-ipc[http]``);
* :mod:`cmd_ipc.server.websocket`: a WebSocket server (``serve_websocket``,
  ``WebSocketHandler``) whose connections join the registry's tree as channels (needs
  ``cmd-ipc[ws]``).

Each submodule imports its optional dependency only when it is imported itself.
"""
