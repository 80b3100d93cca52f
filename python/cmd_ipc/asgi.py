"""cmd-ipc in the ASGI world: the HTTP endpoint of a registry as an ASGI application.

``cmd_ipc.asgi.app(registry, ...)`` answers what :func:`cmd_ipc.server.http.serve` answers
(``POST /cmd``, ``GET /cmds.json``, the token, ``expose=``, the limits), for uvicorn,
hypercorn, or mounted in Starlette or FastAPI::

    import cmd_ipc.asgi

    fastapi_app.mount("/cmd-ipc", cmd_ipc.asgi.app(registry, token=secret))

It is pure ASGI: the ``cmd-ipc[asgi]`` extra installs nothing more (a server such as uvicorn
is yours to choose). The details are in :mod:`cmd_ipc.server.asgi`.
"""

from cmd_ipc.server.asgi import DEFAULT_MAX_BODY, ASGIApp, Message, Receive, Scope, Send, app

__all__ = ["DEFAULT_MAX_BODY", "ASGIApp", "Message", "Receive", "Scope", "Send", "app"]
