"""A real nginx reverse proxy on loopback for tests: its own prefix folder and config, a free port, and
``location /<prefix>/`` passed to an upstream URL (the path prefix stripped, as a proxy in front of BDI does).

Only Debian's nginx binary is needed (``nginx-light``, installed by .ci/run); without it the test skips, or fails
under ``CI=true``. The proxy runs in the foreground (``daemon off``) in its own session and is stopped by its
process group, like the other test servers (tests/helpers/servers.py).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.servers import _stop, free_port

NGINX_PATHS = ("/usr/sbin/nginx",)


def nginx_or_skip() -> str:
    """The nginx binary; else skip (fail under CI=true)."""
    nginx = shutil.which("nginx") or next((p for p in NGINX_PATHS if Path(p).is_file()), None)
    if nginx is None:
        reason = "nginx is not installed (apt-get install nginx-light)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{reason}; CI=true: .ci/run installs it", pytrace=False)
        pytest.skip(reason)
    return nginx


def proxy_config(*, prefix_dir: Path, port: int, path_prefix: str, upstream: str) -> str:
    """nginx.conf: ``/<path_prefix>/…`` → ``<upstream>/…``; every file it writes stays in ``prefix_dir``."""
    # as root, nginx's workers would switch to "nobody" and lose access to the prefix folder
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"  {kind}_temp_path {prefix_dir}/{kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes 1;
daemon off;
pid {prefix_dir}/nginx.pid;
error_log {prefix_dir}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {prefix_dir}/access.log;
{temp}
  client_max_body_size 64m;
  server {{
    listen 127.0.0.1:{port};
    location /{path_prefix}/ {{
      proxy_pass {upstream.rstrip("/")}/;
      proxy_set_header Host $host;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


class NginxProxy:
    """nginx on 127.0.0.1:<free port> passing ``/<path_prefix>/`` to ``upstream``; a context manager."""

    def __init__(self, *, prefix_dir: Path, upstream: str, path_prefix: str = "bdi") -> None:
        self.nginx = nginx_or_skip()
        self.prefix_dir = prefix_dir
        self.upstream = upstream
        self.path_prefix = path_prefix
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The proxied BDI's base URL, prefix included (``http://127.0.0.1:<port>/bdi``)."""
        return f"http://127.0.0.1:{self.port}/{self.path_prefix}"

    @property
    def access_log(self) -> Path:
        return self.prefix_dir / "access.log"

    def requested_paths(self) -> list[str]:
        """The paths nginx was asked for so far, in order (from its access log)."""
        if not self.access_log.is_file():
            return []
        return [line.split('"')[1].split(" ")[1] for line in self.access_log.read_text().splitlines() if '"' in line]

    def __enter__(self) -> NginxProxy:
        self.prefix_dir.mkdir(parents=True, exist_ok=True)
        conf = self.prefix_dir / "nginx.conf"
        conf.write_text(proxy_config(prefix_dir=self.prefix_dir, port=self.port, path_prefix=self.path_prefix,
                                     upstream=self.upstream), encoding="utf-8")
        with (self.prefix_dir / "nginx.out").open("wb") as out:
            self.proc = subprocess.Popen([self.nginx, "-p", str(self.prefix_dir), "-c", str(conf), "-e", "stderr"],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                log = (self.prefix_dir / "nginx.out").read_text(errors="replace")
                raise AssertionError(f"nginx did not proxy {self.base_url}/health:\n{log[-3000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)
