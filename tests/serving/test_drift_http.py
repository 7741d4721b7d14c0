"""Drift per ROI over a real two-worker server (issue 27): a model fitted on seeded synthetic discs and calibrated on
held-out OK samples (its drift reference) watches a seeded stream of OK crops: GET /monitor stays ok and /health
has no warning at every step. Then the light changes (brighter crops): an alarm named ``lighting``, with the same
``since`` from every call, and a /health warning; then the focus goes (blurred crops): an alarm named ``focus``.

With ``BDI_WRITE_DOCS_IMG=1`` the test also draws the statistics over the stream into docs/img/drift_stream.png
(docs/monitoring.md shows it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from tests.helpers.servers import REPO, UvicornServer, server_env
from tests.helpers.synthetic import disc_png, png_bytes

pytestmark = pytest.mark.slow

ROLE, ROI, MM = "Inspection", "disc-1", 0.2
WINDOW, MIN_COUNT, STEP = 60, 30, 10


def _shifted(seed: int, *, brightness: int = 0, blur: float = 0.0) -> bytes:
    image = cv2.imdecode(np.frombuffer(disc_png(seed=seed), np.uint8), cv2.IMREAD_COLOR)
    if brightness:
        image = np.clip(image.astype(np.int16) + brightness, 0, 255).astype(np.uint8)
    if blur:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    return png_bytes(image)


def _roi(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/monitor", params={"roi_id": ROI})
    assert response.status_code == 200, response.text
    (roi,) = response.json()["rois"]
    return dict(roi)


def test_a_lighting_change_and_a_focus_loss_are_alarms_named_for_their_cause(tmp_path: Path) -> None:
    env = server_env(tmp_path, BDI_DRIFT_WINDOW=str(WINDOW), BDI_DRIFT_MIN_COUNT=str(MIN_COUNT))
    history: list[dict[str, Any]] = []  # the ROI's drift after every STEP crops, for the plot
    with UvicornServer(cwd=tmp_path, env=env, workers=2) as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as client:
        form = {"role_id": ROLE, "roi_id": ROI, "mm_per_px": str(MM)}
        fit = client.post("/fit_ok", data=form,
                          files=[("images", (f"fit_{i}.png", disc_png(seed=i), "image/png")) for i in range(10)])
        assert fit.status_code == 200, fit.text
        held_out = [("images", (f"ok_{i}.png", disc_png(seed=1000 + i), "image/png")) for i in range(40)]
        assert client.post("/datasets/ok/upload", data={"role_id": ROLE, "roi_id": ROI},
                           files=held_out).status_code == 200
        calib = client.post("/calibrate_dataset", json={"role_id": ROLE, "roi_id": ROI, "require_ng": False,
                                                        "default_mm_per_px": MM})
        assert calib.status_code == 200, calib.text
        assert client.get("/monitor").json()["rois"] == []  # nothing recorded yet

        def stream(phase: str, images: list[bytes]) -> None:
            for i, image in enumerate(images, start=1):
                answer = client.post("/infer", data=form, files={"image": ("crop.png", image, "image/png")})
                assert answer.status_code == 200, answer.text
                if i % STEP == 0:
                    history.append({"phase": phase, **_roi(client)})
                    if phase == "ok" and history[-1]["n_live"] >= MIN_COUNT:
                        assert history[-1]["status"] == "ok", history[-1]
                        assert client.get("/health").json()["warnings"] == []

        stream("ok", [disc_png(seed=3000 + i) for i in range(60)])
        ok = _roi(client)
        assert ok["status"] == "ok" and ok["n_live"] == WINDOW and ok["cause"] is None
        assert set(ok["series"]) == {"score", "brightness", "contrast", "sharpness"}

        stream("brighter", [_shifted(4000 + i, brightness=40) for i in range(60)])
        lighting = _roi(client)
        assert (lighting["status"], lighting["cause"]) == ("alarm", "lighting"), lighting
        since = lighting["since"]
        assert all(_roi(client)["since"] == since for _ in range(4))  # persisted: every worker says the same
        (warning,) = client.get("/health").json()["warnings"]
        assert (warning["roi_id"], warning["cause"], warning["since"]) == (ROI, "lighting", since)
        assert _drift_status_gauge(client) == 2.0  # /metrics: what deploy/prometheus/alerts.yml alarms on

        stream("blurred", [_shifted(5000 + i, blur=2.0) for i in range(60)])
        focus = _roi(client)
        assert (focus["status"], focus["cause"]) == ("alarm", "focus"), focus
        assert client.get("/health").json()["warnings"][0]["cause"] == "focus"

    if os.environ.get("BDI_WRITE_DOCS_IMG") == "1":
        _plot(history, REPO / "docs" / "img" / "drift_stream.png")


def _drift_status_gauge(client: httpx.Client) -> float:
    """The ROI's ``bdi_drift_status`` sample in the Prometheus text of ``GET /metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    (value,) = [s.value for s in families["bdi_drift_status"].samples if s.labels["roi_id"] == ROI]
    return float(value)


def _plot(history: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [STEP * (i + 1) for i in range(len(history))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for name in ("score", "brightness", "contrast", "sharpness"):
        psi = [h["series"][name]["psi"] if name in h["series"] else np.nan for h in history]
        ks = [-np.log10(max(h["series"][name]["ks_pvalue"], 1e-300)) if name in h["series"] else np.nan
              for h in history]
        top.plot(x, psi, marker="o", markersize=3, label=name)
        bottom.plot(x, ks, marker="o", markersize=3, label=name)
    for ax, (warn, alarm) in ((top, (0.1, 0.25)), (bottom, (3.0, 4.0))):
        ax.axhline(warn, color="orange", linestyle="--", linewidth=1)
        ax.axhline(alarm, color="red", linestyle="--", linewidth=1)
        for start, label in ((0, "OK"), (60, "brighter (+40)"), (120, "blurred (sigma 2)")):
            ax.axvline(start, color="gray", linewidth=0.8)
            ax.text(start + 1, 0.92, label, fontsize=8, transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
    top.set_ylabel(f"PSI, last {WINDOW} crops")
    bottom.set_ylabel("-log10 KS p-value")
    bottom.set_xlabel("crops inspected (status: warn = both orange lines crossed, alarm = both red)")
    top.legend(fontsize=7, loc="lower right")
    top.set_xlim(0, x[-1] + 5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
