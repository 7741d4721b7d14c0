"""A TCP server on loopback that accepts connections and then never answers: a stalled MLflow."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stalling_server(max_connections: int = 256) -> Iterator[str]:
    """Yield ``http://127.0.0.1:<port>``; every connection is accepted, read from, never answered.

    Bounded: at most ``max_connections`` are kept; all are closed when the block ends.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            if len(held) >= max_connections:
                conn.close()
                continue
            held.append(conn)  # keep it open and silent

    thread = threading.Thread(target=accept_forever, name="stalling-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()
