"""`make run` (``python -m serving.demo``): build the demo model (``bdi.demo``), print curl lines, serve it.

The model, its data and its crops are the library's (:func:`bdi.demo.write_demo`); the address the curl lines
name is the server's (``BDI_BACKEND_HOST``/``BDI_BACKEND_PORT`` through ``serving.settings.ServingSettings``),
and the server is ``python -m serving``, started as its own process with the same environment.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bdi.demo import MM_PER_PX, ROI_ID, ROLE_ID, demo_settings, write_demo
from serving.settings import ServingSettings


def try_lines(*, serving_settings: ServingSettings, ng_png: Path, ok_png: Path) -> list[str]:
    """The curl commands that try the served demo model: health, an NG crop and an OK crop."""
    base = serving_settings.base_url()
    form = f"-F role_id={ROLE_ID} -F roi_id={ROI_ID} -F mm_per_px={MM_PER_PX}"
    return [
        f"curl -s {base}/health",
        f"curl -s {form} -F image=@{ng_png} {base}/infer   # a defect: decision ng, regions on it",
        f"curl -s {form} -F image=@{ok_png} {base}/infer   # a good part: decision ok",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__)
    parser.add_argument("--n-train", type=int, default=60, help="OK images to fit on")
    parser.add_argument("--no-serve", action="store_true", help="build the model, print the curl lines and exit")
    args = parser.parse_args(argv)

    files = write_demo(demo_settings(), n_train=args.n_train)
    lines = try_lines(serving_settings=ServingSettings(), ng_png=files.ng_png, ok_png=files.ok_png)
    print("\nTry:\n" + "\n".join(f"  {line}" for line in lines) + "\n")
    if args.no_serve:
        return 0
    return subprocess.call([sys.executable, "-m", "serving"])  # the HTTP server, as its own process


if __name__ == "__main__":
    raise SystemExit(main())
