"""Unit tests for bdi.logging: JSONL lines, context ids, sink choice, concurrent appends."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bdi.logging import (
    LOG_FILE_NAME,
    bind_context,
    configure_logging,
    current_log_file,
    disable_logging,
    slog,
)


@pytest.fixture()
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = configure_logging(tmp_path / "logs-here")
    assert path is not None
    yield path
    disable_logging()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_configure_logging_uses_the_given_dir(tmp_path: Path, log_file: Path) -> None:
    assert log_file == (tmp_path / "logs-here" / LOG_FILE_NAME).absolute()
    assert current_log_file() == log_file


def test_slog_writes_one_json_object_per_line_with_base_keys(log_file: Path) -> None:
    slog("unit.event", answer=42, name="x")
    slog("unit.other")
    first, second = _lines(log_file)
    assert isinstance(first["ts"], float)
    assert first["event"] == "unit.event"
    assert first["pid"] == os.getpid()
    assert first["thread"] == threading.current_thread().name
    assert (first["answer"], first["name"]) == (42, "x")
    assert second["event"] == "unit.other"


def test_slog_adds_bound_ids_unless_the_event_supplies_them(log_file: Path) -> None:
    with bind_context(request_id="rid-1", recipe_id="r1", role_id="Master", roi_id="Pattern"):
        slog("with.context")
        slog("override", request_id="mine")
    slog("after")
    inside, override, after = _lines(log_file)
    assert inside["request_id"] == "rid-1"
    assert (inside["recipe_id"], inside["role_id"], inside["roi_id"]) == ("r1", "Master", "Pattern")
    assert override["request_id"] == "mine"
    assert override["recipe_id"] == "r1"
    assert "request_id" not in after


def test_bind_context_reset_restores_the_outer_ids(log_file: Path) -> None:
    outer = bind_context(request_id="outer")
    inner = bind_context(request_id="inner")
    slog("inner")
    inner.reset()
    slog("outer")
    outer.reset()
    slog("none")
    assert [line.get("request_id") for line in _lines(log_file)] == ["inner", "outer", None]


def test_bind_context_rejects_unknown_ids() -> None:
    with pytest.raises(TypeError):
        bind_context(user="x")


def test_unserialisable_values_are_stringified(log_file: Path, tmp_path: Path) -> None:
    slog("odd", path=tmp_path, obj=object(), nan=float("nan"), arr=np.arange(3), scalar=np.float32(0.5),
         tags={"a"})
    (line,) = _lines(log_file)
    assert line["path"] == str(tmp_path)
    assert line["obj"].startswith("<object object")
    assert line["nan"] == "nan"
    assert line["arr"] == [0, 1, 2]
    assert line["scalar"] == 0.5
    assert line["tags"] == ["a"]


def test_configure_logging_falls_back_to_cwd_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")
    monkeypatch.chdir(tmp_path)
    try:
        chosen = configure_logging(blocker / "sub")
        assert chosen == (tmp_path / "logs" / LOG_FILE_NAME).absolute()
    finally:
        disable_logging()


def test_configure_logging_disables_when_nothing_is_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "logs").write_text("a file where the logs dir would be")
    monkeypatch.chdir(tmp_path)
    assert configure_logging(None) is None
    assert current_log_file() is None
    slog("dropped", x=1)  # must not raise


def test_slog_mirrors_to_the_stdlib_bdi_logger(log_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="bdi"):
        slog("mirrored.event", k="v")
    assert any("mirrored.event" in record.getMessage() for record in caplog.records)


def test_concurrent_threads_write_whole_lines(log_file: Path) -> None:
    def worker(n: int) -> None:
        for i in range(200):
            slog("thread.line", worker=n, i=i, pad="x" * 200)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = _lines(log_file)
    assert len(lines) == 1600
    assert {(line["worker"], line["i"]) for line in lines} == {(n, i) for n in range(8) for i in range(200)}


def _process_writer(path: str, n: int) -> None:
    configure_logging(Path(path).parent)
    for i in range(200):
        slog("process.line", worker=n, i=i, pad="y" * 300)


def test_concurrent_processes_append_without_interleaving(log_file: Path) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_process_writer, args=(str(log_file), n)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = _lines(log_file)  # every line parses: no torn or interleaved writes
    assert len(lines) == 800
    assert len({line["pid"] for line in lines}) == 4
