"""Reaching a Ray cluster, shared by every command that can run on one (``tune``, ``bench``, ``merge``): a
one-line error before any work when Ray is missing or the address is no Ray head, and one session that starts a
local instance when no address is given and stops only what it started.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator, Optional

from submerge.errors import ConfigError


def check_ray_address(address: Optional[str]) -> None:
    """Fail in one line, before any work, when ``address`` (host:port of a Ray head's GCS) cannot be reached."""
    try:
        import ray  # noqa: F401  (only whether it is installed)
    except ImportError:
        raise ConfigError("--backend ray needs the ray package (pip install 'submerge[ray]' or pip install ray)") \
            from None
    if address in (None, "", "local"):
        return
    if address == "auto":
        if not os.environ.get("RAY_ADDRESS") and not os.path.exists("/tmp/ray/ray_current_cluster"):
            raise ConfigError("--address auto: no running Ray cluster found on this machine (start one with "
                              "`ray start --head`, or give its host:port)")
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: give the Ray head as host:port (e.g. 10.0.0.1:6379) or auto")
    try:
        grpc = _speaks_http2(host, int(port))
    except OSError as e:
        raise ConfigError(f"--address {address}: cannot reach a Ray head there ({e.strerror or e})") from None
    if not grpc:
        raise ConfigError(f"--address {address}: something answers there, but not a Ray head (its GCS speaks "
                          f"gRPC); give the port `ray start --head` printed (default 6379)")


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS


def _speaks_http2(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether the server at host:port answers an HTTP/2 connection preface with a SETTINGS frame, as every
    gRPC server (a Ray head's GCS) must; bounded by ``timeout`` seconds.  Raises OSError when unreachable."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(_HTTP2_PREFACE)
        head = b""
        try:
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except (socket.timeout, ConnectionResetError):
            return False
    return len(head) == 9 and head[3] == 4  # frame type 4: SETTINGS


@contextlib.contextmanager
def ray_session(address: Optional[str] = None) -> Iterator[Any]:
    """The ``ray`` module, connected to ``address`` (a new local instance without one); disconnected at the end
    when this session connected it."""
    import ray

    own = not ray.is_initialized()
    if own:
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address not in (None, "", "local"):
            kw["address"] = address
        ray.init(**kw)
    try:
        yield ray
    finally:
        if own:
            ray.shutdown()
