"""Channels: connections between registries. See :mod:`cmd_ipc.channels.base` for the contract."""

from cmd_ipc.channels.base import Channel, Encoding, OnClose, OnFrame
from cmd_ipc.channels.memory import InMemoryChannel

__all__ = ["Channel", "Encoding", "InMemoryChannel", "OnClose", "OnFrame"]
