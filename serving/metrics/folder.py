"""The folder where ``prometheus-client``'s multiprocess mode keeps each worker's values (docs/metrics.md).

One folder per server launch, ``<BDI_METRICS_DIR>/<pid>-<start ticks>`` of the process that launched the
workers (uvicorn's master, found as :func:`multiprocessing.parent_process`; the process itself when it runs
the app alone). So the workers of one launch share it, find it without talking to each other, and never sum
the files of an earlier launch; folders whose launcher is gone are removed at start-up.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import re
import shutil
from pathlib import Path

from prometheus_client import multiprocess, values

ENV_NAME = "PROMETHEUS_MULTIPROC_DIR"  # what prometheus-client reads; set by the server, never by hand
_FOLDER_NAME = re.compile(r"(\d+)-(\d+)")
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22); None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (not Linux): alive or not is all we can tell
        return 0 if _alive(pid) else None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launcher_pid() -> int:
    """The process that launched this server: uvicorn's master for a worker it spawned, else this process."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid is not None else os.getpid()


def launch_folder(base: Path) -> Path:
    """This launch's folder under ``base`` (not created)."""
    pid = launcher_pid()
    return base / f"{pid}-{start_ticks(pid) or 0}"


def remove_stale_folders(base: Path, *, keep: Path) -> list[Path]:
    """Remove the launch folders under ``base`` whose launcher no longer runs (another live server's stay)."""
    removed = []
    for child in base.iterdir() if base.is_dir() else ():
        match = _FOLDER_NAME.fullmatch(child.name)
        if child == keep or match is None or not child.is_dir():
            continue
        pid, ticks = int(match.group(1)), int(match.group(2))
        if start_ticks(pid) not in (ticks, 0):  # gone, or its pid now belongs to another process
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def use_folder(base: Path) -> Path:
    """Make this launch's folder (every worker may call it at once), point prometheus-client at it and switch it
    to multiprocess mode even when it was imported before (its value class is looked up per metric). Instruments
    built afterwards write there (an app built in the same process with another base gets its own files)."""
    folder = launch_folder(base)
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get(ENV_NAME) != str(folder) or not getattr(values.ValueClass, "_multiprocess", False):
        os.environ[ENV_NAME] = str(folder)
        # a fresh value class: the files it opens (once per process) are this folder's
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    remove_stale_folders(base, keep=folder)
    return folder


def forget_dead_workers(folder: Path) -> list[int]:
    """Drop the live-gauge files (``livesum``/``liveall``…) of workers that no longer run, as a supervisor's
    ``mark_process_dead`` would; counters and histograms of dead workers stay (they never go down)."""
    dead = set()
    for name in glob.glob(str(folder / "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.fullmatch(Path(name).name)
        if match is not None and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]
    return sorted(dead)


def worker_exits(folder: Path) -> None:
    """This worker stops: its live gauges leave the sums."""
    multiprocess.mark_process_dead(os.getpid(), str(folder))  # type: ignore[no-untyped-call]
