"""``python -m omni_devkit.console --env-file .omni/dev.env --port 8000``: serve the console."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from omni_devkit.console.app import create_console_app


def main() -> None:
    """Serve the console until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env-file", type=Path, default=Path(".omni/dev.env"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(
        create_console_app(args.env_file.absolute()),
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
