"""serving.metrics.folder (docs/metrics.md "Multiprocess folder"): one folder per launch, named after the process
that launched the workers; dead launches' folders and dead workers' live gauges are dropped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serving.metrics.folder import forget_dead_workers, launch_folder, remove_stale_folders, start_ticks


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_a_process_running_the_app_alone_names_the_folder_after_itself(tmp_path: Path) -> None:
    assert launch_folder(tmp_path) == tmp_path / f"{os.getpid()}-{start_ticks(os.getpid())}"


def test_folders_of_dead_or_reused_launcher_pids_are_removed_live_ones_kept(tmp_path: Path) -> None:
    me = os.getpid()
    mine = tmp_path / f"{me}-{start_ticks(me)}"
    reused = tmp_path / f"{me}-1"  # this pid, but an older process's start time: that launcher is gone
    dead = tmp_path / f"{dead_pid()}-5"
    parent = os.getppid()
    other_live = tmp_path / f"{parent}-{start_ticks(parent)}"  # another server that still runs
    unrelated = tmp_path / "notes"
    for folder in (mine, reused, dead, other_live, unrelated):
        folder.mkdir()
    removed = remove_stale_folders(tmp_path, keep=mine)
    assert sorted(removed) == sorted([reused, dead])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other_live.name, "notes"])


def test_live_gauge_files_of_dead_workers_are_dropped(tmp_path: Path) -> None:
    gone = dead_pid()
    for name in (f"gauge_livesum_{gone}.db", f"gauge_livesum_{os.getpid()}.db", f"counter_{gone}.db"):
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_workers(tmp_path) == [gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"gauge_livesum_{os.getpid()}.db",
                                                                 f"counter_{gone}.db"])
