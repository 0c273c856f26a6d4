"""`domainlm console`: open the home folder, print the URL with the token, serve until Ctrl-C."""

from __future__ import annotations

import socket
import sys

from domainlm.console.settings import ConsoleConfig
from domainlm.errors import DomainLMError


def serve(cfg: ConsoleConfig) -> None:
    from domainlm import outputs

    outputs.folder(cfg.home, "--home")  # an existing file is named before anything starts
    try:
        import uvicorn

        from domainlm.console.app import Console
        from domainlm.console.web import create_app
    except ImportError as e:
        raise DomainLMError(
            f"the console needs its extra: pip install 'domainlm[console]' ({e.name} is missing)"
        ) from None
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
        sock.listen(128)  # connections wait in the backlog from the moment the URL is printed
    except OSError as e:
        raise DomainLMError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e.strerror})") from None
    port = sock.getsockname()[1]
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    console = Console(cfg, url=f"http://{shown}:{port}")
    app = create_app(console)
    print(f"domainlm console: {console.url}/?token={console.token}", flush=True)
    print(
        f"home {console.home}; webhook signatures use the key in {console.home / '.webhook-secret'} "
        "unless --webhook-secret",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
