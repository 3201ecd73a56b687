"""Free loopback ports for the servers the tests start (Ray heads, MLflow, moto), shared by every test module."""

import socket


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct ports free right now: all are bound at once (so none repeats), then released for the caller."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
