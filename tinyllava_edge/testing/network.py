"""A socket guard for tests: every attempt to reach another machine is recorded and refused.

    with NetworkGuard() as guard:
        ...                       # import, train, load, serve
    assert guard.attempts == []   # [] or ["huggingface.co:443 (getaddrinfo) from kernels/..."]

Name lookups of anything but this machine count as attempts too (they are traffic, and the
first step of every connection). Loopback addresses and Unix sockets pass: the demo's server and
its test client talk over 127.0.0.1. The refusal is an OSError, what a library sees offline, so
code that falls back when offline goes on; the record is what a test checks, since libraries
swallow the error (bitsandbytes does).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import traceback

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", ""})
# Frames left out of an attempt's "from": the HTTP and socket layers say nothing about who asked.
_PLUMBING = ("/socket.py", "/ssl.py", "/http/client.py", "/urllib/", "/httpx", "/httpcore", "/urllib3/",
             "/requests/", "/anyio/", "/asyncio/", "testing/network.py")


def is_local(host) -> bool:
    """True for this machine: loopback addresses, `localhost`, the empty host."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).split("%", 1)[0].strip("[]").lower()
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NetworkGuard:
    """Patches `socket` while active; `attempts` lists what tried to leave, with where from."""

    def __init__(self):
        self.attempts: list[str] = []
        self._lock = threading.Lock()
        self._saved: dict[str, object] = {}

    def _refuse(self, what: str, host, port=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if not any(part in f.filename for part in _PLUMBING)]
        where = " <- ".join(f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}" for f in frames[-4:][::-1])
        with self._lock:
            self.attempts.append(f"{host}:{port} ({what}) from {where}")
        raise OSError(f"tinyllava-edge test network guard: {what} to {host}:{port} refused")

    def __enter__(self) -> NetworkGuard:
        guard = self
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        real_getaddrinfo, real_gethostbyname = socket.getaddrinfo, socket.gethostbyname
        real_gethostbyname_ex = socket.gethostbyname_ex
        self._saved = {"connect": real_connect, "connect_ex": real_connect_ex, "getaddrinfo": real_getaddrinfo,
                       "gethostbyname": real_gethostbyname, "gethostbyname_ex": real_gethostbyname_ex}

        def remote(sock, address) -> bool:
            return sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0])

        def connect(sock, address):
            if remote(sock, address):
                guard._refuse("connect", address[0], address[1])
            return real_connect(sock, address)

        def connect_ex(sock, address):
            if remote(sock, address):
                guard._refuse("connect", address[0], address[1])
            return real_connect_ex(sock, address)

        def getaddrinfo(host, port, *args, **kwargs):
            if not is_local(host):
                guard._refuse("getaddrinfo", host, port)
            return real_getaddrinfo(host, port, *args, **kwargs)

        def gethostbyname(host):
            if not is_local(host):
                guard._refuse("gethostbyname", host)
            return real_gethostbyname(host)

        def gethostbyname_ex(host):
            if not is_local(host):
                guard._refuse("gethostbyname", host)
            return real_gethostbyname_ex(host)

        socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
        socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex = getaddrinfo, gethostbyname, \
            gethostbyname_ex
        return self

    def __exit__(self, *exc) -> None:
        socket.socket.connect = self._saved["connect"]
        socket.socket.connect_ex = self._saved["connect_ex"]
        socket.getaddrinfo = self._saved["getaddrinfo"]
        socket.gethostbyname = self._saved["gethostbyname"]
        socket.gethostbyname_ex = self._saved["gethostbyname_ex"]
