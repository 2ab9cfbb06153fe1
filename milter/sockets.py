"""Socket names as Postfix and Sendmail spell them: inet:HOST:PORT, inet:PORT@HOST, inet6:, unix:/path."""

from __future__ import annotations

import socket


def parse_socket_name(spec: str, what: str = "socket") -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """(family, address): a path for UNIX sockets, (host, port) for TCP; ValueError with the reason.

    A missing host means loopback. Port 0 is allowed (bind to a free port; connecting
    to it simply fails).
    """
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"{what} {spec!r}: expected inet:HOST:PORT or unix:/path")
    if kind in ("unix", "local"):
        if not rest:
            raise ValueError(f"{what} {spec!r}: no socket path")
        return socket.AF_UNIX, rest
    if kind in ("inet", "inet6"):
        if "@" in rest:
            port, _, host = rest.partition("@")
        else:
            host, _, port = rest.rpartition(":")
        host = host.strip("[]") or ("::1" if kind == "inet6" else "127.0.0.1")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{what} {spec!r}: bad port {port!r}")
        family = socket.AF_INET6 if kind == "inet6" or ":" in host else socket.AF_INET
        return family, (host, int(port))
    raise ValueError(f"{what} {spec!r}: unknown socket type {kind!r} (use inet, inet6 or unix)")


def listen_tcp(host: str, port: int, backlog: int = 256) -> socket.socket:
    """A listening TCP socket on HOST:PORT (the first address HOST resolves to); OSError if not.

    Bound by the parent before it forks, so every worker process accepts on the same
    socket (SMTP mode's listener, as the milter socket is shared).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket says it is TCP.
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
