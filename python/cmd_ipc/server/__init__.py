"""Servers: expose a registry to remote clients.

* :mod:`cmd_ipc.server.http`: an aiohttp endpoint (``create_app``, ``add_routes``,
  ``serve``) for :class:`~cmd_ipc.HTTPChannel` clients (needs ``cmd-ipc[http]``);
* :mod:`cmd_ipc.server.asgi` (public as :mod:`cmd_ipc.asgi`): the same endpoint as an ASGI
  application, for uvicorn or mounted in Starlette/FastAPI (no dependency beyond cmd-ipc);
* :mod:`cmd_ipc.server.websocket`: a WebSocket server (``serve_websocket``,
  ``WebSocketHandler``) whose connections join the registry's tree as channels (needs
  ``cmd-ipc[ws]``);
* :mod:`cmd_ipc.server.grpc`: a gRPC server (``serve_grpc``, ``GrpcHandler``) whose
  ``cmdipc.v1.Mesh/Connect`` streams join the registry's tree as channels (needs
  ``cmd-ipc[grpc]``).

Each submodule imports its optional dependency only when it is imported itself.
"""
