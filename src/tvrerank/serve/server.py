"""Starting ``tvrerank serve``: the artifacts of a demo folder, the listening socket, uvicorn.

The socket is bound before uvicorn starts, so a port in use is a one-line error and ``--port 0``
prints the port the system chose.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from tvrerank.errors import InputError, MissingInput, TvrerankError, reason_of


def require_web_stack() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise TvrerankError(f"the search page needs FastAPI and uvicorn ({reason_of(exc)}); "
                            "install them with: pip install 'tvrerank[serve]'") from None


def demo_artifacts(demo_dir: str | Path) -> dict[str, Path]:
    """A `tvrerank demo` output folder → its test gallery, index and re-ranker run."""
    demo = Path(demo_dir)
    paths = {"gallery": demo / "cache" / "test.h5", "index": demo / "index" / "test", "reranker": demo / "run",
             "videos": demo / "data"}
    for what, path in paths.items():
        if not path.exists():
            raise MissingInput(f"{demo} is not a finished `tvrerank demo` folder: its {what} {path} is missing; "
                               "run `tvrerank demo --out DIR` first, or pass --gallery, --index and --reranker")
    return paths


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); a clear error when that fails."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: not an address this machine can listen on ({reason_of(exc)})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = "pass another --port (0: any free one)" if port else "check --host"
        raise InputError(f"cannot listen on {host}:{port} ({reason_of(exc)}); {hint}") from None
    return sock


def allowed_hosts(host: str) -> list[str] | None:
    """The Host header values a loopback server answers (None: any, when it listens beyond loopback)."""
    if not is_loopback(host):
        return None
    return sorted({"localhost", "127.0.0.1", "[::1]", host if ":" not in host else f"[{host}]"})


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run(app, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until interrupted (Ctrl-C)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
