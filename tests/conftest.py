"""Suite-wide fixtures: every frame an in-memory channel carries is validated against the
spec-v1 JSON Schemas, so every message our codecs emit in the suite is checked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import spec_support
from cmd_ipc.channels.memory import InMemoryChannel


@pytest.fixture(autouse=True)
def validate_in_memory_frames(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    original = InMemoryChannel.send

    def send(self: InMemoryChannel, frame: bytes) -> None:
        spec_support.validate_frame(frame, self.encoding)
        original(self, frame)

    monkeypatch.setattr(InMemoryChannel, "send", send)
    yield
