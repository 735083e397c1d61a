"""Run the service (what `make serve` does):

    python -m service --host 127.0.0.1 --port 8000
    XCROSS_ARTIFACTS=/path/to/artifacts REDIS_URL=redis://127.0.0.1:6379/0 python -m service --port 9000

Settings come from XCROSS_* variables (docs/service.md). Models, catalogs and the token cache are loaded before
the server listens: a bad setting or a corrupt / mismatched checkpoint prints one line to stderr and exits with
code 2. SIGTERM / Ctrl-C drains (service/drain.py, docs/reliability.md): /readyz answers 503 `draining` at once,
requests are still answered for XCROSS_DRAIN_S (with `Connection: close`), then the server stops accepting, finishes
the requests in flight and the queued batches, and exits 0 within XCROSS_GRACEFUL_TIMEOUT_S of the signal. A
second SIGTERM / Ctrl-C stops at once (the process ends as killed by it).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

import uvicorn

from model.checkpoint import CheckpointError
from service.catalog import CatalogError
from service.drain import DrainingServer
from service.loading import StartupError, load_engine
from service.settings import SettingsError, load_settings

EXIT_STARTUP = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="X-Cross recommendation service")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        engine = load_engine(settings)
    except (SettingsError, StartupError, CheckpointError, CatalogError, OSError) as exc:
        print(f"xcross-serve: cannot start: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_STARTUP
    from service.app import create_app

    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=settings.log_level)
    server = DrainingServer(config, drain_s=settings.drain_s, graceful_timeout_s=settings.graceful_timeout_s,
                            on_drain=app.state.service.drain)
    server.run()
    gc.freeze()  # the process ends now: no final collection over the models' objects (seconds on a busy machine)
    return 0 if server.started else EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
