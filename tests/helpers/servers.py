"""Real servers on loopback: a PostgreSQL cluster, an ``mlflow server`` on it with proxied artefacts on
local disk, and BDI itself, ``uvicorn serving.app:app`` (:class:`UvicornServer`, the only way a test starts
one; :func:`server_env` gives it the tiny model). Each starts its process, waits until it answers and stops
exactly the process group it started."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from bdi.logging import LOG_FILE_NAME
from tests.helpers.tiny import TINY_ENV

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 240.0  # two workers importing torch on a busy 2-core machine
PG_USER = "bdi"  # the cluster's superuser (trust authentication, loopback only)
PG_DB = "mlflow"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without BDI/MLflow/DVC settings, with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "BDI_", "BRAKEDISC_", "MLFLOW_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def postgres_bindir() -> Path | None:
    """Where Debian's ``postgresql`` package put ``initdb``/``pg_ctl`` (not on PATH), else PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _wait_http(url: str, *, proc: subprocess.Popen[bytes], log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} did not answer {url} within {timeout_s:.0f} s:\n"
                         f"{log.read_text(errors='replace')[-4000:]}")


def _stop(proc: subprocess.Popen[bytes] | None, *, timeout_s: float = 20) -> None:
    """Stop the process group the server was started in (``mlflow server`` runs uvicorn as a child)."""
    if proc is None:
        return
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


class PostgresCluster:
    """``initdb`` + ``pg_ctl start`` of a throw-away cluster on 127.0.0.1:<free port>, database ``mlflow``.

    PostgreSQL refuses to run as root (CI runs as root): then the cluster belongs to the ``postgres``
    user that Debian's package creates, its folder is made outside root's private temp dirs, and the
    server commands run through ``runuser``.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="bdi-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{PG_DB}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        out = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False,
                             cwd=self.root)
        assert out.returncode == 0, f"{args[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"

    def __enter__(self) -> PostgresCluster:
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise AssertionError("running as root needs the 'postgres' user (apt-get install postgresql)") from exc
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        try:
            bin_ = str(self.bindir)
            self._run(f"{bin_}/initdb", "-D", str(self.data), "-A", "trust", "-U", PG_USER, "-E", "UTF8", "--no-sync")
            options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
            self._run(f"{bin_}/pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60",
                      "start")
            self._run(f"{bin_}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, PG_DB)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self._as, f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` with ``backend_uri`` as its backend store and proxied artefacts in ``artifacts``.

    ``COMMAND`` is also docs/deploy.md "Single box"'s command (tests/deploy/test_deploy_files.py checks it)."""

    COMMAND = ("mlflow server --backend-store-uri {backend} --artifacts-destination {artifacts} --serve-artifacts "
               "--host 127.0.0.1 --port {port} --workers 1")

    def __init__(self, *, backend_uri: str, artifacts: Path, scratch: Path) -> None:
        self.backend_uri = backend_uri
        self.artifacts = artifacts
        self.port = free_port()
        self.log = scratch / "mlflow-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MlflowServer:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            argv = self.COMMAND.format(backend=self.backend_uri, artifacts=self.artifacts, port=self.port).split()
            self.proc = subprocess.Popen(
                [str(VENV_BIN / argv[0]), *argv[1:]],
                cwd=self.log.parent, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            _wait_http(f"{self.uri}/health", proc=self.proc, log=self.log, timeout_s=240, what="mlflow server")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class UvicornServer:
    """``uvicorn serving.app:app`` on a free loopback port: the one way tests start a real BDI server.

    ``env`` is the child's whole environment (build it with :func:`server_env`), ``cwd`` its working
    folder (its output goes to ``cwd/<name>.out``). As a context manager it starts, waits for ``/health``
    and stops; :meth:`start` + :meth:`wait_ready` start several at once. The server runs in its own
    session, and :meth:`stop` tears down exactly that process group (the parent and its workers).
    """

    def __init__(self, *, cwd: Path, env: Mapping[str, str], workers: int = 1, name: str = "uvicorn",
                 startup_timeout_s: float = STARTUP_TIMEOUT_S, launcher: str = "uvicorn",
                 ready_path: str = "/health") -> None:
        self.cwd = cwd
        self.env = dict(env)
        self.workers = workers
        self.launcher = launcher  # "uvicorn": uvicorn's CLI; "serving": ``python -m serving`` (its uvicorn options)
        self.name = name
        self.ready_path = ready_path  # answers 200 once started ("/ui/" when BDI_AUTH=required closes /health)
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.log = cwd / f"{name}.out"  # stdout + stderr
        self.log_file = Path(self.env.get("BDI_GUI_LOG_DIR", cwd / "logs")) / LOG_FILE_NAME  # JSONL events
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> UvicornServer:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:  # the child keeps its own copy of the handle
            if self.launcher == "serving":
                argv = ["-m", "serving", "--workers", str(self.workers),
                        "--host", "127.0.0.1", "--port", str(self.port)]
            else:
                argv = ["-m", "uvicorn", "serving.app:app", "--workers", str(self.workers),
                        "--host", "127.0.0.1", "--port", str(self.port), "--timeout-graceful-shutdown", "10"]
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout_s: float | None = None, *, retries: int = 3) -> UvicornServer:
        """Wait for /health. The port was free when chosen, but until uvicorn binds it another process's
        outgoing connection may take it (e.g. the other replica syncing): then start again on a new one."""
        assert self.proc is not None, "not started"
        timeout = self.startup_timeout_s if timeout_s is None else timeout_s
        try:
            _wait_http(f"{self.base_url}{self.ready_path}", proc=self.proc, log=self.log, timeout_s=timeout,
                       what=self.name)
        except AssertionError:
            if retries <= 0 or "address already in use" not in self.log.read_text(errors="replace"):
                raise
            self.stop()
            self.port = free_port()
            self.start().wait_ready(timeout, retries=retries - 1)
        return self

    def stop(self, *, timeout_s: float = 20) -> None:
        """SIGTERM to the server's process group (uvicorn's parent stops its workers), then SIGKILL."""
        _stop(self.proc, timeout_s=timeout_s)

    def __enter__(self) -> UvicornServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSONL diagnostics events logged so far (``name``: only those)."""
        if not self.log_file.is_file():
            return []
        out = []
        for line in self.log_file.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def memory(self) -> dict[int, tuple[int, int]]:
        """``{pid: (VmRSS, VmHWM)}`` in bytes of every live process of the server's group (parent and workers)."""
        out: dict[int, tuple[int, int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.pid:  # the process group, after "(comm) state ppid"
                    continue
                status = dict(line.split(":", 1) for line in (stat.parent / "status").read_text().splitlines())
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            rss, hwm = (int(status[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM"))
            out[int(stat.parent.name)] = (rss, hwm)
        return out

    def reset_peak_memory(self) -> None:
        """Reset every group process's VmHWM to its current RSS (``clear_refs`` 5), so that :meth:`memory` then
        gives the peak since now."""
        for pid in self.memory():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                continue  # gone meanwhile

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""


def server_env(scratch: Path, models_dir: Path | None = None, **overrides: str) -> dict[str, str]:
    """The environment of a tiny-model server (:data:`tests.helpers.tiny.TINY_ENV`): nothing inherited of
    BDI/MLflow/DVC, models in ``models_dir`` (default ``scratch/models``), logs, weights under ``scratch``."""
    env = clean_env(**TINY_ENV)
    env.update(
        BDI_MODELS_DIR=str(models_dir if models_dir is not None else scratch / "models"),
        BDI_GUI_LOG_DIR=str(scratch / "logs"),
        BDI_WEIGHTS_CACHE_DIR=str(scratch / "weights"),
        BDI_REQUIRE_CUDA="0",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env
