"""The operator page at /ui (serving/routes/ui.py, serving/static/) in a real browser: Debian's headless
``chromium`` driven by Playwright for Python, against a real ``uvicorn serving.app:app`` serving the demo
backbone (the pretrained EfficientNet-Lite0 of ``bdi.demo``) on the synthetic discs, so defects are found.

Without chromium or playwright the browser tests skip, saying why; with ``CI=true`` they fail instead.
Screenshots go to ``test-artefacts/ui/`` (``BDI_TEST_ARTEFACTS`` moves the folder). With
``BDI_UI_README_SHOT=<png>`` one more test writes README's screenshot: the page inspecting a magnetic-tile defect
(``BDI_UI_README_DATA``, default ``bdi.demo.SHARED_DATA``) when that data exists, else a synthetic disc.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bdi.backbones import PRETRAINED_CNN
from bdi.data.synthetic import write_mvtec_dataset
from tests.helpers.browser import chromium_or_skip
from tests.helpers.proxy import NginxProxy
from tests.helpers.servers import REPO, UvicornServer, server_env

MM = 0.2
ROLE = "Inspection"
ROI_INSPECT = "inspection-1"  # fitted and calibrated through the API by the fixture
ROI_THRESHOLD = "inspection-2"  # the same, for the tests that change the threshold
ROI_PAGE_FIT = "inspection-3"  # samples only: the page fits and calibrates it
ROI_UPLOAD = "inspection-4"  # empty: the page uploads and deletes
ROI_BAND = "inspection-5"  # fitted and calibrated by its test, which then sets its OK / review / NG band
TABLET = {"width": 768, "height": 1024}
PAGE_FIT_EXTRA = 38  # more OK discs for ROI_PAGE_FIT: its fit lasts a few of the page's progress polls
ARTEFACTS = Path(os.environ.get("BDI_TEST_ARTEFACTS", REPO / "test-artefacts")) / "ui"
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.slow  # a real server (and browser) per module
CNN_ENV = {"BDI_BACKBONE": PRETRAINED_CNN, "BDI_WEIGHTS": "official", "BDI_INPUT_SIZE": "128"}


@dataclass(frozen=True)
class Demo:
    server: UvicornServer
    ng_image: Path  # a defective test disc the model has not seen
    ok_images: list[Path]
    ng_images: list[Path]
    page_fit_ok: int  # the OK samples of ROI_PAGE_FIT: enough that the page sees its fit's progress

    @property
    def url(self) -> str:
        return self.server.base_url


def cnn_env(scratch: Path, models_dir: Path | None = None) -> dict[str, str]:
    """A server environment with the demo's pretrained CNN instead of the tiny ViT (its blocks/depth dropped)."""
    env = server_env(scratch, models_dir, **CNN_ENV)
    for name in ("BDI_FEATURE_BLOCKS", "BDI_BACKBONE_DEPTH"):
        env.pop(name, None)
    return env


def api_upload(url: str, *, roi_id: str, label: str, paths: list[Path]) -> None:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    data = {"role_id": ROLE, "roi_id": roi_id, "metas": [f'{{"mm_per_px": {MM}}}'] * len(paths)}
    response = httpx.post(f"{url}/datasets/{label}/upload", data=data, files=files, timeout=60)
    assert response.status_code == 200, response.text


def api_fit_and_calibrate(url: str, *, roi_id: str) -> None:
    fit = httpx.post(f"{url}/fit_ok", data={"role_id": ROLE, "roi_id": roi_id, "mm_per_px": MM, "use_dataset": "true"},
                     timeout=300)
    assert fit.status_code == 200, fit.text
    calib = httpx.post(f"{url}/calibrate_dataset", json={"role_id": ROLE, "roi_id": roi_id}, timeout=300)
    assert calib.status_code == 200, calib.text


def api_infer(
    url: str, image: Path, *, roi_id: str = ROI_INSPECT, shape: dict[str, Any] | None = None
) -> httpx.Response:
    data = {"role_id": ROLE, "roi_id": roi_id, "mm_per_px": MM, "include_heatmap": "true"}
    if shape is not None:
        data["shape"] = json.dumps(shape)
    return httpx.post(f"{url}/infer", data=data, files={"image": (image.name, image.read_bytes(), "image/png")},
                      timeout=120)


def api_scores(url: str, *, roi_id: str) -> tuple[list[float], list[float], float]:
    body = httpx.post(f"{url}/infer_dataset", json={"role_id": ROLE, "roi_id": roi_id}, timeout=300).json()
    ok = [i["score"] for i in body["items"] if i["label"] == "ok" and i["error"] is None]
    ng = [i["score"] for i in body["items"] if i["label"] == "ng" and i["error"] is None]
    return ok, ng, body["items"][0]["threshold"]


def manifest(url: str, *, roi_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/manifest", params={"role_id": ROLE, "roi_id": roi_id}, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One server; two ROIs fitted and calibrated through the API, one holding samples only."""
    root = tmp_path_factory.mktemp("ui")
    data = write_mvtec_dataset(root / "discs", n_train=10, n_test_good=4, n_test_per_defect=2, size=128)
    ok_images = sorted((data / "train" / "good").glob("*.png"))
    ng_images = sorted(p for d in (data / "test").iterdir() if d.name != "good" for p in d.glob("*.png"))
    more = write_mvtec_dataset(root / "more", n_train=PAGE_FIT_EXTRA, n_test_good=1, n_test_per_defect=1, seed=1)
    page_fit_ok = ok_images + sorted((more / "train" / "good").glob("*.png"))
    with UvicornServer(cwd=root / "server", env=cnn_env(root / "server")) as server:
        for roi_id in (ROI_INSPECT, ROI_THRESHOLD, ROI_PAGE_FIT):
            api_upload(server.base_url, roi_id=roi_id, label="ok", paths=page_fit_ok if roi_id == ROI_PAGE_FIT
                       else ok_images)
            api_upload(server.base_url, roi_id=roi_id, label="ng", paths=ng_images[1:])
        for roi_id in (ROI_INSPECT, ROI_THRESHOLD):
            api_fit_and_calibrate(server.base_url, roi_id=roi_id)
        yield Demo(server=server, ng_image=ng_images[0], ok_images=ok_images, ng_images=ng_images,
                   page_fit_ok=len(page_fit_ok))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=chromium, headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


@pytest.fixture()
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A tablet-sized page; its screenshot is saved as a test artefact when the test ends."""
    context = browser.new_context(viewport=TABLET)
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(ARTEFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_page(page: Any, demo: Demo, *, roi_id: str) -> None:
    page.goto(f"{demo.url}/ui")  # redirected to ui/
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#roi", roi_id)
    page.dispatch_event("#roi", "change")


def verdict(infer_body: dict[str, Any]) -> str:
    """What the page shows for an /infer answer: ``review`` for a score in the band, else the decision."""
    return "review" if infer_body["review"] else str(infer_body["decision"])


def inspect_and_check(page: Any, demo: Demo, image: Path) -> dict[str, Any]:
    """Inspect ``image`` from the page and check what it shows against the API's answer for the same image."""
    api = api_infer(demo.url, image)
    assert api.status_code == 200, api.text
    expected = api.json()
    page.set_input_files("#image-file", str(image))
    page.click("#infer-run")
    page.wait_for_function("document.getElementById('decision').textContent !== ''"
                           " || document.getElementById('infer-error').textContent !== ''")
    assert page.text_content("#infer-error") == ""
    assert page.text_content("#decision") == verdict(expected)
    page.wait_for_selector("#view-heatmap[data-drawn='1']", state="attached")
    assert page.locator("#view-overlay .region-outline").count() == len(expected["regions"])
    return expected


def test_infer_sends_its_stage_timings_as_a_server_timing_header(demo: Demo) -> None:
    response = api_infer(demo.url, demo.ng_image)
    assert response.status_code == 200, response.text
    timing = response.headers["server-timing"]
    stages = dict(part.strip().split(";dur=") for part in timing.split(","))
    assert {"decode", "forward"} <= set(stages), timing
    assert all(float(ms) >= 0 for ms in stages.values())
    assert "timings_ms" not in response.json()  # the body stays the contract's


def test_ui_redirects_relatively_and_the_page_uses_only_relative_urls(demo: Demo) -> None:
    redirect = httpx.get(f"{demo.url}/ui", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"  # resolves under a proxy prefix
    index = httpx.get(f"{demo.url}/ui/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    for name in ("index.html", "app.js", "style.css"):
        text = httpx.get(f"{demo.url}/ui/{name}").text
        assert 'src="/' not in text and 'href="/' not in text and "http://" not in text.replace(
            "http://www.w3.org/2000/svg", ""), name
    missing = httpx.get(f"{demo.url}/ui/nothing.js")
    assert missing.status_code == 404 and missing.json() == {"detail": "ui file not found"}
    assert httpx.get(f"{demo.url}/ui/..%2Fapp.py").status_code == 404


def test_calibrate_manual_refuses_a_threshold_that_is_not_positive_and_an_unfitted_model(demo: Demo) -> None:
    bad = httpx.post(f"{demo.url}/calibrate_manual", json={"role_id": ROLE, "roi_id": ROI_THRESHOLD, "threshold": 0})
    assert bad.status_code == 400 and "threshold" in bad.json()["error"]
    unfitted = httpx.post(f"{demo.url}/calibrate_manual", json={"role_id": ROLE, "roi_id": "nothing", "threshold": 1})
    assert unfitted.status_code == 400
    assert unfitted.json()["error"] == "Memoria no encontrada. Ejecuta /fit_ok antes de /calibrate_manual."


def test_page_inspects_a_defect_with_heatmap_region_outlines_and_the_apis_decision(page: Any, demo: Demo) -> None:
    open_page(page, demo, roi_id=ROI_INSPECT)
    expected = inspect_and_check(page, demo, demo.ng_image)
    assert expected["decision"] == "ng" and expected["regions"], "the demo model finds the synthetic defect"
    labels = page.locator("#view-overlay .region-label").all_text_contents()
    assert labels[0] == f"1: {expected['regions'][0]['area_mm2']:.2f} mm²"
    timings = page.locator("#timings tbody td:first-child").all_text_contents()
    assert "forward" in timings
    assert page.text_content("#score") == f"{expected['score']:.4f}"
    info = page.text_content("#model-info") or ""
    assert "efficientnet" in info.lower() and "runtime" in info
    page.fill("#opacity", "0.8")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector("#view-heatmap", "el => el.style.opacity") == "0.8"


def shape_fields(page: Any) -> dict[str, float]:
    """The ROI mask's numbers as the page's labelled fields show them."""
    values: dict[str, float] = page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('#shape-fields input')]"
        ".map((el) => [el.id.slice(6), Number(el.value)]))")
    return values


def drag_handle(page: Any, name: str, *, dx: float, dy: float) -> None:
    """Drag the mask's handle ``name`` with the mouse by (dx, dy) image pixels."""
    handle = page.locator(f"#view-overlay [data-handle='{name}']")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    scale = page.locator("#view-overlay").bounding_box()["width"] / page.evaluate(
        "document.getElementById('view-image').naturalWidth")
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx * scale, y + dy * scale, steps=6)
    page.mouse.up()


def test_page_edits_the_roi_mask_with_its_handles_and_infer_receives_the_edited_roi(page: Any, demo: Demo) -> None:
    open_page(page, demo, roi_id=ROI_INSPECT)
    page.set_input_files("#image-file", str(demo.ng_image))
    page.wait_for_selector("#viewer", state="visible")
    page.select_option("#shape-kind", "annulus")
    assert shape_fields(page) == {"cx": 64, "cy": 64, "r": 64, "r_inner": 32}  # the 128 px disc's default
    diagonal = 2**-0.5  # the radii's handles sit on the diagonals: r up-right, r_inner down-right of the centre
    drag_handle(page, "r_inner", dx=16 * diagonal, dy=16 * diagonal)  # 16 px outwards
    assert shape_fields(page) == {"cx": 64, "cy": 64, "r": 64, "r_inner": 48}
    drag_handle(page, "r", dx=-8 * diagonal, dy=8 * diagonal)  # 8 px inwards
    assert shape_fields(page) == {"cx": 64, "cy": 64, "r": 56, "r_inner": 48}
    drag_handle(page, "move", dx=-10, dy=5)
    assert shape_fields(page) == {"cx": 54, "cy": 69, "r": 56, "r_inner": 48}
    page.focus("#view-overlay [data-handle='r']")  # and with the keyboard
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.focus("#view-overlay [data-handle='r_inner']")
    page.keyboard.press("Shift+ArrowLeft")
    edited = {"kind": "annulus", "cx": 54, "cy": 69, "r": 58, "r_inner": 38}
    assert shape_fields(page) == {k: v for k, v in edited.items() if k != "kind"}
    radii = page.eval_on_selector_all("#view-overlay circle.mask",
                                      "els => els.map((el) => Number(el.getAttribute('r')))")
    assert radii == [58, 38]  # the mask drawn over the image is the edited one
    page.evaluate("""() => { const send = window.fetch; window.sentShapes = [];  // what leaves the page
        window.fetch = (url, init) => { if (init && init.body instanceof FormData) window.sentShapes.push(
            init.body.get('shape')); return send(url, init); }; }""")
    page.click("#infer-run")
    page.wait_for_function("document.getElementById('score').textContent !== ''")
    assert [json.loads(sent) for sent in page.evaluate("window.sentShapes")] == [edited]
    api = api_infer(demo.url, demo.ng_image, shape=edited).json()
    assert page.text_content("#score") == f"{api['score']:.4f}"
    unmasked = api_infer(demo.url, demo.ng_image).json()  # the mask changed the answer: nothing is hot outside it
    assert api["heatmap_png_base64"] != unmasked["heatmap_png_base64"]
    page.select_option("#shape-kind", "rect")  # a rect's corners resize it
    assert shape_fields(page) == {"x": 0, "y": 0, "w": 128, "h": 128}
    assert page.evaluate("document.documentElement.scrollWidth") <= TABLET["width"]  # corner handles stay inside
    drag_handle(page, "se", dx=-28, dy=-18)
    drag_handle(page, "nw", dx=10, dy=20)
    assert shape_fields(page) == {"x": 10, "y": 20, "w": 90, "h": 90}
    assert page.get_attribute("#view-overlay rect.mask", "width") == "90"


def test_page_works_behind_nginx_under_a_path_prefix(page: Any, demo: Demo, tmp_path: Path) -> None:
    """A real nginx passes /bdi/ to the server (default CORS settings): the page at /bdi/ui inspects a defect
    and every request it makes goes through the prefix (its URLs are relative to itself, never ``/infer``)."""
    expected = api_infer(demo.url, demo.ng_image).json()
    with NginxProxy(prefix_dir=tmp_path / "nginx", upstream=demo.url, path_prefix="bdi") as proxy:
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(f"{proxy.base_url}/ui")  # the server's relative redirect keeps the prefix: /bdi/ui/
        page.wait_for_selector("body[data-ready='1']")
        assert page.url == f"{proxy.base_url}/ui/"
        page.fill("#roi", ROI_INSPECT)
        page.dispatch_event("#roi", "change")
        page.wait_for_function("document.getElementById('target-state').textContent.includes('model')")
        page.set_input_files("#image-file", str(demo.ng_image))
        page.click("#infer-run")
        page.wait_for_function("document.getElementById('decision').textContent !== ''"
                               " || document.getElementById('infer-error').textContent !== ''")
        assert page.text_content("#infer-error") == ""
        assert page.text_content("#decision") == verdict(expected)
        page.wait_for_selector("#view-heatmap[data-drawn='1']", state="attached")
        assert page.locator("#view-overlay .region-outline").count() == len(expected["regions"])
        assert "forward" in page.locator("#timings tbody td:first-child").all_text_contents()  # the header passed
        page.click("#tab-samples")  # the thumbnails' URLs too
        page.wait_for_function("document.querySelectorAll('#thumbs-ok .thumb img').length > 0")
        page.wait_for_function("[...document.querySelectorAll('.thumb img')]"
                               ".every((i) => i.complete && i.naturalWidth)")
        http = [url for url in requested if url.startswith("http")]
        assert http and all(url.startswith(f"{proxy.base_url}/") for url in http), http
        paths = proxy.requested_paths()
    for route in ("/bdi/ui/app.js", "/bdi/health", "/bdi/manifest", "/bdi/infer", "/bdi/datasets/list",
                  "/bdi/datasets/file"):
        assert any(path.split("?")[0] == route for path in paths), (route, paths)


def test_a_broken_route_is_caught(page: Any, demo: Demo) -> None:
    """If /infer moved (a renamed route), the inspection check fails: the page shows the 404, no decision."""
    open_page(page, demo, roi_id=ROI_INSPECT)
    page.route("**/infer", lambda route: route.fulfill(status=404, content_type="application/json",
                                                        body='{"detail":"Not Found"}'))
    with pytest.raises(AssertionError):
        inspect_and_check(page, demo, demo.ng_image)
    assert page.text_content("#infer-error") == "HTTP 404: Not Found"
    assert page.text_content("#decision") == ""


def test_a_server_error_appears_verbatim_next_to_the_control_that_caused_it(page: Any, demo: Demo) -> None:
    api = api_infer(demo.url, demo.ng_image, roi_id="never-fitted")
    assert api.status_code == 400
    open_page(page, demo, roi_id="never-fitted")
    page.set_input_files("#image-file", str(demo.ng_image))
    page.click("#infer-run")
    page.wait_for_function("document.getElementById('infer-error').textContent !== ''")
    assert page.text_content("#infer-error") == f"HTTP 400: {api.json()['error']}"
    assert "no model" in (page.text_content("#target-state") or "")


def test_page_uploads_by_file_input_and_drop_and_deletes_a_sample(page: Any, demo: Demo) -> None:
    open_page(page, demo, roi_id=ROI_UPLOAD)
    page.click("#tab-samples")
    page.set_input_files("#upload-ok", [str(p) for p in demo.ok_images[:2]])
    page.wait_for_function("document.querySelectorAll('#thumbs-ok .thumb').length === 2")
    dropped = page.evaluate_handle(
        """(b64) => { const dt = new DataTransfer();
           const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
           dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'})); return dt; }""",
        base64.b64encode(demo.ng_images[0].read_bytes()).decode())
    page.dispatch_event("#drop-ng", "drop", {"dataTransfer": dropped})
    page.wait_for_function("document.querySelectorAll('#thumbs-ng .thumb').length === 1")
    page.wait_for_function("[...document.querySelectorAll('.thumb img')].every((i) => i.complete && i.naturalWidth)")
    listing = httpx.get(f"{demo.url}/datasets/list", params={"role_id": ROLE, "roi_id": ROI_UPLOAD}).json()
    assert listing["classes"]["ok"]["count"] == 2 and listing["classes"]["ng"]["count"] == 1
    name = listing["classes"]["ok"]["files"][0]
    page.click(f"button[aria-label='Delete ok sample {name}']")
    page.wait_for_function("document.querySelectorAll('#thumbs-ok .thumb').length === 1")
    listing = httpx.get(f"{demo.url}/datasets/list", params={"role_id": ROLE, "roi_id": ROI_UPLOAD}).json()
    assert name not in listing["classes"]["ok"]["files"] and listing["classes"]["ok"]["count"] == 1
    api = httpx.post(f"{demo.url}/fit_ok", data={"role_id": ROLE, "roi_id": ROI_UPLOAD, "mm_per_px": MM,
                                                  "use_dataset": "true"}, timeout=60)
    assert api.status_code == 400  # one OK sample is too few: the page shows the server's words under Fit
    page.click("#fit-run")
    page.wait_for_function("document.getElementById('fit-error').textContent !== ''")
    assert page.text_content("#fit-error") == f"HTTP 400: {api.json()['error']}"
    assert page.text_content("#fit-result") == "" and page.text_content("#calibrate-error") == ""
    assert page.is_hidden("#fit-progress") and page.is_enabled("#fit-run")


def test_page_fits_and_calibrates_from_the_stored_samples_with_progress(page: Any, demo: Demo) -> None:
    open_page(page, demo, roi_id=ROI_PAGE_FIT)
    page.click("#tab-samples")
    determinate: dict[str, list[Any]] = {}
    for job, done in (("fit", "fitted"), ("calibrate", "threshold")):
        page.evaluate("""([id, out]) => { window.sawProgress = false; window.bar = [];
            const el = document.getElementById(id);
            new MutationObserver(() => {
              if (el.hidden) return;
              window.sawProgress = true;  // the server's done/total of a stage, and the text beside the bar
              if (el.hasAttribute('value')) window.bar.push([el.value, el.max, el.getAttribute('aria-valuetext'),
                                                            document.getElementById(out).textContent]);
            }).observe(el, {attributes: true}); }""", [f"{job}-progress", f"{job}-result"])
        page.click(f"#{job}-run")
        page.wait_for_function(f"document.getElementById('{job}-result').textContent.startsWith('{done}')"
                               f" || document.getElementById('{job}-error').textContent !== ''",
                               timeout=300_000)
        assert page.text_content(f"#{job}-error") == ""
        assert page.evaluate("window.sawProgress") is True
        determinate[job] = page.evaluate("window.bar")
        page.wait_for_selector(f"#{job}-progress", state="hidden")  # and it goes when the job ends
    assert determinate["fit"], "the fit's bar never showed the server's progress"
    stages = {"fit": ("images embedded", "coreset centres chosen"), "calibrate": ("OK samples", "NG samples")}
    for job, seen in determinate.items():  # a calibration may end before a poll: its bar is checked when seen
        for value, maximum, text, beside in seen:
            assert 0 <= value <= maximum and maximum > 0
            assert text.startswith(stages[job]) and text.endswith(f" {value:g}/{maximum:g}"), text
            assert beside.startswith("running… ") and beside.endswith(text)
    body = manifest(demo.url, roi_id=ROI_PAGE_FIT)
    assert body["memory"] is True
    shown = page.text_content("#calibrate-result") or ""
    assert shown.startswith(f"threshold {body['calib']['threshold']:.4f} from {demo.page_fit_ok} OK / "
                            f"{len(demo.ng_images) - 1} NG")
    assert page.text_content("#fit-result").startswith("fitted: ")  # type: ignore[union-attr]
    assert page.text_content("#target-state") == "model ✓ · calibrated ✓"


def candidate_value(page: Any) -> float:
    """The candidate threshold the page counts with (exact; the range input's own value may be rounded)."""
    return float(page.get_attribute("#candidate", "data-value"))


def _counts(threshold: float, ok: list[float], ng: list[float]) -> tuple[int, int]:
    """False rejects (OK ≥ threshold) and escapes (NG < threshold): /infer's decision rule."""
    return sum(s >= threshold for s in ok), sum(s < threshold for s in ng)


def test_moving_the_candidate_threshold_updates_false_rejects_and_escapes(page: Any, demo: Demo) -> None:
    ok, ng, current = api_scores(demo.url, roi_id=ROI_INSPECT)
    open_page(page, demo, roi_id=ROI_INSPECT)
    page.click("#tab-threshold")
    page.click("#scores-load")
    page.wait_for_selector("#threshold-view", state="visible")
    assert page.text_content("#n-ok") == str(len(ok)) and page.text_content("#n-ng") == str(len(ng))
    assert page.locator("#histogram .bar").count() > 0 and page.locator("#roc .curve").count() == 1
    for candidate in sorted({current, *ok[:3], *ng[:3], min(ok) * 0.5, max(ng) * 1.5}):
        page.fill("#candidate-value", repr(candidate))
        page.dispatch_event("#candidate-value", "change")
        shown = (int(page.text_content("#false-rejects") or -1), int(page.text_content("#escapes") or -1))
        assert shown == _counts(candidate_value(page), ok, ng), candidate
    box = page.locator("#histogram").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.4, steps=5)
    page.mouse.up()
    dragged = candidate_value(page)
    assert dragged != current
    shown = (int(page.text_content("#false-rejects") or -1), int(page.text_content("#escapes") or -1))
    assert shown == _counts(dragged, ok, ng)


def test_applying_a_threshold_stores_a_manual_calibration_and_restore_brings_back_the_previous(
    page: Any, demo: Demo
) -> None:
    before = manifest(demo.url, roi_id=ROI_THRESHOLD)["calib"]["threshold"]
    open_page(page, demo, roi_id=ROI_THRESHOLD)
    page.click("#tab-threshold")
    page.click("#scores-load")
    page.wait_for_selector("#threshold-view", state="visible")
    page.fill("#candidate-value", repr(before * 0.9))
    page.dispatch_event("#candidate-value", "change")
    candidate = candidate_value(page)
    page.click("#threshold-apply")
    page.wait_for_function("document.getElementById('threshold-result').textContent.startsWith('applied')")
    body = manifest(demo.url, roi_id=ROI_THRESHOLD)
    assert body["calib"]["threshold"] == pytest.approx(candidate, rel=1e-12)
    assert body["calib"]["source"] == "manual" and body["lineage"]["threshold_source"] == "manual"
    assert page.text_content("#current-threshold") == f"{candidate:.4f}"
    page.click("#threshold-restore")
    page.wait_for_function("document.getElementById('threshold-result').textContent.startsWith('restored')")
    assert manifest(demo.url, roi_id=ROI_THRESHOLD)["calib"]["threshold"] == before
    assert page.is_disabled("#threshold-restore")


def set_band(demo: Demo, *, roi_id: str, low: float, high: float) -> None:
    """Rewrite the stored calibration's band (its contract threshold kept), as a later calibration could."""
    [path] = Path(demo.server.env["BDI_MODELS_DIR"]).glob(f"recipes/default/{roi_id}/*_calib.json")
    stored = json.loads(path.read_text())
    stored.update(threshold_low=low, threshold_high=high, band_collapsed=False)
    path.write_text(json.dumps(stored))


def test_page_shows_a_score_in_the_band_as_review_with_both_thresholds(page: Any, demo: Demo) -> None:
    api_upload(demo.url, roi_id=ROI_BAND, label="ok", paths=demo.ok_images)
    api_upload(demo.url, roi_id=ROI_BAND, label="ng", paths=demo.ng_images[1:])
    api_fit_and_calibrate(demo.url, roi_id=ROI_BAND)
    score = api_infer(demo.url, demo.ng_image, roi_id=ROI_BAND).json()["score"]
    low, high = score / 2, score * 2
    set_band(demo, roi_id=ROI_BAND, low=low, high=high)
    expected = api_infer(demo.url, demo.ng_image, roi_id=ROI_BAND).json()
    assert expected["review"] is True and expected["decision"] == "ng"
    open_page(page, demo, roi_id=ROI_BAND)
    page.set_input_files("#image-file", str(demo.ng_image))
    page.click("#infer-run")
    page.wait_for_function("document.getElementById('decision').textContent !== ''")
    assert page.inner_text("#decision") == "REVIEW"
    assert page.eval_on_selector("#decision", "el => getComputedStyle(el).color") == "rgb(178, 106, 0)"  # --warn
    assert "decision ng" in (page.text_content("#decision-note") or "")
    assert page.is_visible("#band") and page.is_visible("#band-zone")
    assert (page.text_content("#threshold-low"), page.text_content("#threshold-high")) == (f"{low:.4f}", f"{high:.4f}")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "review_verdict.png"), full_page=True)
    page.click("#tab-models")
    page.wait_for_selector(f"#models tbody tr[data-roi='{ROI_BAND}'] td:nth-child(7)")
    cells = page.locator(f"#models tbody tr[data-roi='{ROI_BAND}'] td").all_text_contents()
    assert cells[5] == f"{expected['threshold']:.4f}" and cells[6] == f"{low:.4f} – {high:.4f}"
    # a threshold set by hand replaces the band: the page shows the plain decision again, no band
    manual = httpx.post(f"{demo.url}/calibrate_manual", json={"role_id": ROLE, "roi_id": ROI_BAND, "threshold": high},
                        timeout=60)
    assert manual.status_code == 200, manual.text
    page.click("#tab-inspect")
    page.click("#infer-run")
    page.wait_for_function("document.getElementById('decision').textContent === 'ok'")
    assert page.text_content("#decision-note") == ""
    assert page.is_hidden("#band") and page.is_hidden("#band-zone")


def test_models_tab_shows_each_roi_with_lineage_and_marks_one_without_a_model(page: Any, demo: Demo) -> None:
    open_page(page, demo, roi_id=ROI_INSPECT)
    open_page(page, demo, roi_id="never-fitted")  # the current ROI, and one the page remembers:
    page.evaluate("""() => localStorage.setItem('bdi-ui-targets', JSON.stringify([
        {recipe_id: 'default', role_id: 'Inspection', roi_id: 'inspection-1'}]))""")
    page.click("#tab-models")
    page.wait_for_selector("#models tbody tr[data-roi='never-fitted'] td.warn")
    fitted = page.locator("#models tbody tr[data-roi='inspection-1'] td").all_text_contents()
    assert fitted[3] == "fitted" and fitted[4] == "api" and fitted[9] == "api"
    missing = page.locator("#models tbody tr[data-roi='never-fitted'] td").all_text_contents()
    assert missing[3] == "⚠ no model" and missing[4] == "⚠ no calibration"
    assert "registry" in (page.text_content("#server-info") or "")


def test_page_fits_a_tablet_width_and_every_control_is_labelled_and_reachable_by_keyboard(
    page: Any, demo: Demo
) -> None:
    open_page(page, demo, roi_id=ROI_INSPECT)
    for tab in ("inspect", "samples", "threshold", "models"):
        page.click(f"#tab-{tab}")
        assert page.evaluate("document.documentElement.scrollWidth") <= TABLET["width"], tab
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, button')].filter((el) =>
        !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map((el) => el.id || el.outerHTML)""")
    assert unlabelled == []
    page.focus("#tab-models")
    page.keyboard.press("ArrowRight")  # wraps to the first tab
    assert page.evaluate("document.activeElement.id") == "tab-inspect"
    assert page.is_visible("#panel-inspect") and page.is_hidden("#panel-models")


@pytest.mark.skipif(not os.environ.get("BDI_UI_README_SHOT"), reason="set BDI_UI_README_SHOT=<png> to write it")
def test_readme_screenshot_of_the_page_inspecting_a_defect(tmp_path: Path, browser: Any) -> None:
    """README's picture: a demo model (bdi.demo) on the magnetic tiles when present, else the synthetic discs."""
    from bdi.config import Settings
    from bdi.demo import SHARED_DATA, build_demo_model

    data = Path(os.environ.get("BDI_UI_README_DATA", SHARED_DATA))
    if not data.is_dir():
        data = write_mvtec_dataset(tmp_path / "discs", n_train=20, n_test_good=4, n_test_per_defect=2, size=256)
    models = tmp_path / "models"
    settings = Settings(models_dir=models, log_dir=tmp_path / "logs", weights_cache_dir=tmp_path / "weights",
                        model={"features": {"backbone": PRETRAINED_CNN, "weights": "official", "device": "cpu"}})
    model = build_demo_model(settings, data_root=data, n_train=30)
    env = cnn_env(tmp_path / "server", models)
    env.pop("BDI_INPUT_SIZE")  # the backbone's own, as the demo model was built with
    with UvicornServer(cwd=tmp_path / "server", env=env) as server:
        context = browser.new_context(viewport={"width": 1024, "height": 760})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.base_url}/ui")
        page.wait_for_selector("body[data-ready='1']")
        page.set_input_files("#image-file", str(model.ng_sample.path))
        page.click("#infer-run")
        page.wait_for_function("document.getElementById('decision').textContent !== ''")
        page.wait_for_selector("#view-heatmap[data-drawn='1']", state="attached")
        shot = Path(os.environ["BDI_UI_README_SHOT"])
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        context.close()
    from PIL import Image

    with Image.open(shot) as picture:  # a palette PNG: small enough to commit
        picture.convert("RGB").quantize(colors=128).save(shot, optimize=True)
