"""Free TCP ports on the loopback interface (for fake servers, launched servers and rendezvous)."""

from __future__ import annotations

import socket


def free_port(consecutive: int = 1) -> int:
    """A port ``p`` such that ``p .. p + consecutive - 1`` are all free now (launched SGLang engines take
    ``base_port + k``)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive - 1 > 65535:
            continue
        try:
            for k in range(1, consecutive):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {consecutive} consecutive free ports found")
