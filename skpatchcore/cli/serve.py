"""``skpatchcore serve``: the HTTP scoring service of :mod:`skpatchcore.serve`, run by uvicorn."""

from __future__ import annotations

import argparse

from ._common import CommandError, apply_pixel_limit, info


def run_serve(args: argparse.Namespace) -> int:
    """Run ``skpatchcore serve`` with parsed arguments until interrupted; returns the exit status.

    The socket is bound before the server starts, so that ``--port 0`` takes
    a free port, which the first line printed names.
    """
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as error:
        raise CommandError(f"'skpatchcore serve' needs FastAPI and uvicorn: pip install 'skpatchcore[serve]' "
                           f"({error})") from error
    apply_pixel_limit(args)
    app = create_app(args.model, workers=args.workers, threads=args.threads, max_images=args.max_images,
                     max_request_bytes=int(args.max_request_mb * 2**20), device=args.device)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    try:
        sock = config.bind_socket()
    except SystemExit as error:  # uvicorn exits when the address cannot be bound, after logging why
        raise CommandError(f"cannot listen on {args.host}:{args.port}") from error
    host, port = sock.getsockname()[:2]
    service = app.state.service
    info(args, f"Serving {args.model} on http://{host}:{port} ({service.workers} workers x {service.threads} "
               f"torch threads; API docs at http://{host}:{port}/docs). Ctrl-C stops.")
    uvicorn.Server(config).run(sockets=[sock])
    return 0
