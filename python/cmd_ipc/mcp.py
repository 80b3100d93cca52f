"""MCP for cmd-ipc (needs the ``cmd-ipc[mcp]`` extra, the official ``mcp`` SDK).

Both directions of the Model Context Protocol, in one import:

* :class:`MCPServer`, :func:`serve_http` (:mod:`cmd_ipc.server.mcp`): every public command a
  registry can route to (its tree's and its peers') as MCP tools for agents, over stdio or
  streamable HTTP, with ``notifications/tools/list_changed`` when the set changes;
* :class:`MCPClientChannel` (:mod:`cmd_ipc.channels.mcp`): an MCP server's tools as
  commands of a registry and of its tree.

From the command line: ``cmd-ipc mcp serve pkg.mod:setup [--http HOST:PORT] [--token T]``.
Runnable examples, and how to register the server with an agent: docs/mcp.md.
"""

from cmd_ipc.channels.mcp import MCPClientChannel
from cmd_ipc.server.mcp import MCPHTTPServer, MCPServer, command_tool, serve_http

__all__ = ["MCPClientChannel", "MCPHTTPServer", "MCPServer", "command_tool", "serve_http"]
