"""Run the service (what `make serve` does):

    python -m service --host 127.0.0.1 --port 8000
    XCROSS_ARTIFACTS=/path/to/artifacts REDIS_URL=redis://127.0.0.1:6379/0 python -m service --port 9000

Settings come from XCROSS_* variables (README "Service"). Models, catalogs and the token cache are loaded before
the server listens: a bad setting or a corrupt / mismatched checkpoint prints one line to stderr and exits with
code 2. SIGTERM / Ctrl-C: uvicorn stops accepting connections, lets in-flight requests finish (at most
XCROSS_GRACEFUL_TIMEOUT_S), the batcher drains, and uvicorn re-raises the signal, so the process ends as killed by
SIGTERM (status 143 in a shell, -15 from Popen) after a clean shutdown, as supervisors expect.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from model.checkpoint import CheckpointError
from service.catalog import CatalogError
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

    uvicorn.run(create_app(settings, engine=engine), host=args.host, port=args.port, log_level=settings.log_level,
                timeout_graceful_shutdown=int(settings.graceful_timeout_s) or 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
