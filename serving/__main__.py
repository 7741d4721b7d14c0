"""``python -m serving [--host H] [--port P] [--workers N]``: run uvicorn on ``serving.app:app``.

Host and port default to ``BDI_BACKEND_HOST``/``BDI_BACKEND_PORT`` (legacy ``BRAKEDISC_*``, then
``HOST``/``PORT``) through ``serving.settings.ServingSettings``; an invalid port falls back to 8000
(docs/contract.md "Other environment variables").
``--workers`` defaults to ``WEB_CONCURRENCY`` (as uvicorn's own CLI) and is exported to the workers
as ``WEB_CONCURRENCY``, so each one takes its share of the CPU cores (``Settings.intra_op_threads``).
Each worker holds at most ``BDI_LIMIT_CONCURRENCY`` connections and requests (then 503) and closes an idle
keep-alive connection after ``BDI_TIMEOUT_KEEP_ALIVE_S`` (``ServingSettings``). OpenCV's own pixel limit
(``OPENCV_IO_MAX_IMAGE_PIXELS``, read once when ``cv2`` is imported) is set to ``BDI_MAX_IMAGE_PIXELS`` for the
workers before any of them imports it (``Settings.opencv_env``). X-Forwarded-For/-Proto are trusted only
from ``BDI_TRUSTED_PROXIES`` (none by default).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import uvicorn

from bdi.config import Settings
from serving.settings import ServingSettings

APP_PATH = "serving.app:app"


def parse_args(
    argv: Sequence[str] | None, *, settings: Settings, serving_settings: ServingSettings
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving", description="Run the BDI HTTP backend.")
    parser.add_argument("--host", default=serving_settings.backend_host, help="bind address (BDI_BACKEND_HOST)")
    parser.add_argument("--port", type=int, default=serving_settings.backend_port, help="port (BDI_BACKEND_PORT)")
    parser.add_argument("--workers", type=int, default=settings.workers,
                        help="worker processes, each loads the model and gets cores/workers threads "
                             "(default WEB_CONCURRENCY or 1)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    settings, serving_settings = Settings(), ServingSettings()
    args = parse_args(argv, settings=settings, serving_settings=serving_settings)
    os.environ["WEB_CONCURRENCY"] = os.environ["BDI_WORKERS"] = str(max(1, args.workers))  # each worker's Settings
    os.environ.update(settings.opencv_env())  # before the app (and cv2) is imported, here or in a worker
    os.environ["BDI_BACKEND_HOST"] = args.host  # the workers' start-up warning sees the address bound
    trusted = serving_settings.trusted_proxies.strip()
    uvicorn.run(APP_PATH, host=args.host, port=args.port, workers=max(1, args.workers),
                log_level=args.log_level, limit_concurrency=serving_settings.limit_concurrency,
                timeout_keep_alive=serving_settings.timeout_keep_alive_s,
                proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None)


if __name__ == "__main__":
    main()
