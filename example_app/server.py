"""Serve an app under uvicorn on a listening socket inherited from the parent process.

``python -m example_app.server --fd N [--app module:attribute] [--workers N]``: the parent binds the
socket (so it knows the port before the server starts, with no race for it) and passes it with
``pass_fds``. With ``--workers N`` uvicorn's own supervisor (what ``uvicorn --workers N`` runs)
starts N worker processes that all accept on that one socket; it needs the app as an import
string, since each worker imports it afresh.
"""

from __future__ import annotations

import argparse
import inspect
import socket
from collections.abc import Sequence
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; each worker's lifespan shutdown runs before it exits."""
    parser = argparse.ArgumentParser(prog="python -m example_app.server", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="a listening TCP socket's fd")
    parser.add_argument("--app", default="example_app:app", help="the ASGI app to import")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(
        args.app, log_level=args.log_level, access_log=False, workers=args.workers
    )
    server = uvicorn.Server(config)
    if args.workers == 1:
        server.run(sockets=[sock])
        return
    options: dict[str, Any] = {"sockets": [sock]}
    if "target" in inspect.signature(Multiprocess).parameters:
        # Older uvicorn (0.30 at least) runs the target it is given in each worker; newer uvicorn
        # makes each worker's server itself and takes no target.
        options["target"] = server.run
    Multiprocess(config, **options).run()


if __name__ == "__main__":
    main()
