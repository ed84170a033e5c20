"""A TCP endpoint on 127.0.0.1 that accepts every connection and never answers: a stuck S3, API server,
PostgreSQL or Redis as its clients see it (the connection is made, no byte ever comes back)."""

from __future__ import annotations

import socket
import threading
import time


class SilentEndpoint:
    """Accepts and holds connections until ``close``; ``accepted``: when each was made (``time.monotonic``)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted: list[float] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self.held)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self.held.append(conn)
                self.accepted.append(time.monotonic())

    def close(self) -> None:
        self.server.close()
        with self._lock:
            for conn in self.held:
                conn.close()

    def __enter__(self) -> SilentEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
