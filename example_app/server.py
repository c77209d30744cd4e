"""Serve an app under uvicorn on a listening socket inherited from the parent process.

``python -m example_app.server --fd N [--app module:attribute]``: the parent binds the socket (so
it knows the port before the server starts, with no race for it) and passes it with ``pass_fds``.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence

import uvicorn


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server until SIGINT or SIGTERM; its lifespan's shutdown runs before it exits."""
    parser = argparse.ArgumentParser(prog="python -m example_app.server", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="a listening TCP socket's fd")
    parser.add_argument("--app", default="example_app:app", help="the ASGI app to import")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(args.app, log_level=args.log_level, access_log=False)
    # One process for now. Several workers would share this socket through
    # uvicorn.supervisors.Multiprocess(config, target=server.run, sockets=[sock]).
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
