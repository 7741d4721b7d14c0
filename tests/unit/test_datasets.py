"""Unit tests for bdi.storage.datasets: uploads (unique, all-or-nothing), listing, meta, delete, clear, MVTec."""

from __future__ import annotations

import json
import re
import resource
import threading
from pathlib import Path

import pytest

from bdi.data.mvtec import read_mvtec
from bdi.errors import InvalidInputError, InvalidRecipeError, NotFoundError, StorageError
from bdi.logging import configure_logging, disable_logging
from bdi.refs import DatasetRef
from bdi.storage.datasets import DatasetStore, UploadItem, client_extension, parse_label

BASE = "SW5zcGVjdGlvbg__aW5zcGVjdGlvbi0x"
STORED_NAME = re.compile(r"^\d{8}-\d{6}-\d{6}\.(png|jpg|jpeg|bmp|webp)$")
MAGNETIC_TILE = Path("/work/shared/data/magnetic_tile")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the store does not decode; the service validated it


def _ref(recipe: str = "default") -> DatasetRef:
    return DatasetRef(recipe_id=recipe, role_id="Inspection", roi_id="inspection-1")


def _item(name: str | None = "a.png", meta: dict[str, object] | None = None, data: bytes = PNG) -> UploadItem:
    return UploadItem(data=data, client_filename=name, meta=meta or {})


@pytest.fixture()
def datasets(tmp_path: Path) -> DatasetStore:
    return DatasetStore(tmp_path / "models")


def _ok_dir(datasets: DatasetStore, recipe: str = "default") -> Path:
    return datasets.root / "recipes" / recipe / "datasets" / BASE / "ok"


# ------------------------------------------------------------------------------------------ labels, refs


@pytest.mark.parametrize(("raw", "expected"), [("ok", "ok"), ("OK", "ok"), (" Ng ", "ng")])
def test_parse_label_is_case_insensitive(raw: str, expected: str) -> None:
    assert parse_label(raw) == expected


@pytest.mark.parametrize("raw", ["bad", "", "oks"])
def test_parse_label_rejects_anything_else(raw: str) -> None:
    with pytest.raises(InvalidInputError, match="label must be 'ok' or 'ng'"):
        parse_label(raw)


def test_dataset_ref_requires_a_normalised_recipe() -> None:
    with pytest.raises(InvalidRecipeError):
        DatasetRef(recipe_id="My Layout", role_id="a", roi_id="b")


@pytest.mark.parametrize(
    ("name", "ext"),
    [("a.png", ".png"), ("A.JPG", ".jpg"), (None, ".png"), ("noext", ".png"), ("x.exe", ".png"),
     ("C:\\dir\\b.BMP", ".bmp"), ("d/e.webp", ".webp")],
)
def test_client_extension_is_lower_cased_and_defaults_to_png(name: str | None, ext: str) -> None:
    assert client_extension(name) == ext


# ------------------------------------------------------------------------------------------ save


def test_upload_is_stored_in_the_current_layout_with_a_sidecar(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ok", [_item()])
    assert STORED_NAME.match(saved)
    image = _ok_dir(datasets) / saved
    assert image.read_bytes() == PNG
    meta = json.loads(image.with_suffix(".json").read_text())
    assert meta["role_id"] == "Inspection" and meta["roi_id"] == "inspection-1"
    assert (meta["label"], meta["filename"], meta["recipe_id"]) == ("ok", saved, "default")
    assert meta["created_at_utc"].endswith("Z")
    assert meta["client_filename"] == "a.png"


def test_sidecar_filename_is_the_stored_name_and_client_keys_are_kept(datasets: DatasetStore) -> None:
    client = {"mm_per_px": 0.2, "filename": "sample_x.png", "label": "ok", "angle": None,
              "shape_json": '{"kind":"rect","x":0,"y":0,"w":10,"h":10}'}
    (saved,) = datasets.save(_ref("r1"), "ok", [_item("sample_x.png", client)])
    meta = datasets.read_meta(_ref("r1"), "ok", saved)
    assert meta["filename"] == saved
    assert meta["client_filename"] == "sample_x.png"
    assert meta["shape_json"] == client["shape_json"]
    assert meta["mm_per_px"] == 0.2 and meta["angle"] is None


def test_uppercase_extension_is_saved_lower_case(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ng", [_item("PHOTO.JPG")])
    assert saved.endswith(".jpg")


def test_upload_names_are_unique_under_concurrency(datasets: DatasetStore) -> None:
    saved: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(20):
            names = datasets.save(_ref(), "ok", [_item(f"w{n}-{i}.png" if i % 2 else f"w{n}-{i}.jpg")])
            with lock:
                saved.extend(names)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(saved) == len(set(saved)) == 160
    directory = _ok_dir(datasets)
    stems = {Path(name).stem for name in saved}
    assert len(stems) == 160  # no two images share a sidecar
    for name in saved:
        assert json.loads((directory / name).with_suffix(".json").read_text())["filename"] == name
    assert datasets.listing(_ref())["classes"]["ok"]["count"] == 160
    assert not list(directory.glob(".*"))  # no temp files left behind


def test_a_failing_item_rolls_back_the_earlier_ones(datasets: DatasetStore, tmp_path: Path) -> None:
    log_file = configure_logging(tmp_path / "logs")
    datasets.save(_ref(), "ok", [_item("kept.png")])
    before = sorted(p.name for p in _ok_dir(datasets).iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    items = [_item("1.png"), _item("2.png", data=b"\x00" * (1 << 20)), _item("3.png")]
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # item 2 hits EFBIG
    try:
        with pytest.raises(StorageError, match="nothing was kept"):
            datasets.save(_ref(), "ok", items)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        disable_logging()
    assert sorted(p.name for p in _ok_dir(datasets).iterdir()) == before
    assert log_file is not None
    (event,) = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert event["event"] == "datasets.upload.rolled_back"
    assert event["n_removed"] == 2  # item 1 and its sidecar had been stored, then removed


def test_a_meta_that_is_not_strict_json_stores_nothing(datasets: DatasetStore) -> None:
    items = [_item("1.png"), _item("2.png", {"angle": float("nan")})]
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        datasets.save(_ref(), "ok", items)
    assert not (datasets.root / "recipes").exists()


def test_uploads_always_write_the_requested_recipe(datasets: DatasetStore) -> None:
    datasets.save(_ref(), "ok", [_item()])
    datasets.save(_ref("r2"), "ok", [_item()])
    assert len(list(_ok_dir(datasets, "r2").glob("*.png"))) == 1


# ------------------------------------------------------------------------------------------ listing


def test_listing_shows_only_existing_classes(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ok", [_item()])
    assert datasets.listing(_ref()) == {
        "role_id": "Inspection",
        "roi_id": "inspection-1",
        "classes": {"ok": {"count": 1, "files": [saved], "meta": {saved: True}}},
    }


def test_listing_of_an_unknown_roi_is_empty(datasets: DatasetStore) -> None:
    ref = DatasetRef(recipe_id="default", role_id="x", roi_id="y")
    assert datasets.listing(ref) == {"role_id": "x", "roi_id": "y", "classes": {}}


def test_listing_filters_extensions_sorts_and_reports_missing_sidecars(datasets: DatasetStore) -> None:
    directory = _ok_dir(datasets)
    directory.mkdir(parents=True)
    for name in ("b.PNG", "a.jpeg", "notes.txt", "c.json", "z.webp"):
        (directory / name).write_bytes(b"x")
    (directory / "a.json").write_text("{}")
    ok = datasets.listing(_ref())["classes"]["ok"]
    assert ok["files"] == ["a.jpeg", "b.PNG", "z.webp"]
    assert ok["meta"] == {"a.jpeg": True, "b.PNG": False, "z.webp": False}
    assert datasets.counts(_ref()) == {"ok": 3, "ng": 0}


def test_a_new_recipe_lists_the_default_dataset_until_its_first_upload(datasets: DatasetStore) -> None:
    (default_name,) = datasets.save(_ref(), "ok", [_item()])
    assert datasets.listing(_ref("r2"))["classes"]["ok"]["files"] == [default_name]
    (r2_name,) = datasets.save(_ref("r2"), "ok", [_item()])
    assert datasets.listing(_ref("r2"))["classes"]["ok"]["files"] == [r2_name]


def test_a_case_variant_recipe_dir_is_read(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref("mylayout"), "ok", [_item()])
    (datasets.root / "recipes" / "mylayout").rename(datasets.root / "recipes" / "MyLayout")
    assert datasets.listing(_ref("mylayout"))["classes"]["ok"]["files"] == [saved]


def test_legacy_dataset_dir_is_read_through_sanitised_names(datasets: DatasetStore) -> None:
    legacy = datasets.root / "datasets" / "Inspection" / "inspection-1" / "ok"
    legacy.mkdir(parents=True)
    (legacy / "old.png").write_bytes(PNG)
    assert datasets.resolve_base(_ref()) == legacy.parent
    assert datasets.file_path(_ref(), "ok", "old.png") == legacy / "old.png"


def test_traversal_ids_never_reach_outside_the_root(tmp_path: Path, datasets: DatasetStore) -> None:
    outside = tmp_path / "outside" / "ok"
    outside.mkdir(parents=True)
    (outside / "secret.png").write_bytes(PNG)
    (datasets.root / "datasets").mkdir(parents=True)
    evil = DatasetRef(recipe_id="default", role_id="../..", roi_id="outside")
    root = datasets.root.resolve()
    assert all(p.resolve().is_relative_to(root) for p in datasets.candidates(evil))
    assert datasets.listing(evil)["classes"] == {}
    assert datasets.clear(evil, "ok").cleared == 0
    assert datasets.delete(evil, "ok", "secret.png") is False
    assert (outside / "secret.png").exists()


# ------------------------------------------------------------------------------------------ file, meta


def test_file_path_uses_only_the_basename(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ok", [_item()])
    expected = _ok_dir(datasets) / saved
    assert datasets.file_path(_ref(), "ok", saved) == expected
    assert datasets.file_path(_ref(), "OK", f"../../x/{saved}") == expected
    assert datasets.file_path(_ref(), "ok", f"..\\..\\{saved}") == expected


@pytest.mark.parametrize("filename", ["missing.png", "../x", "..", ""])
def test_file_path_of_a_missing_file_is_not_found(datasets: DatasetStore, filename: str) -> None:
    datasets.save(_ref(), "ok", [_item()])
    with pytest.raises(NotFoundError, match="file not found"):
        datasets.file_path(_ref(), "ok", filename)


def test_file_path_without_a_dataset_is_not_found(datasets: DatasetStore) -> None:
    with pytest.raises(NotFoundError, match="file not found"):
        datasets.file_path(_ref(), "ok", "a.png")


def test_a_bad_label_is_invalid_input_with_or_without_a_dataset(datasets: DatasetStore) -> None:
    for call in (datasets.file_path, datasets.read_meta, datasets.delete):
        with pytest.raises(InvalidInputError):
            call(_ref(), "bad", "a.png")
    datasets.save(_ref(), "ok", [_item()])
    for call in (datasets.file_path, datasets.read_meta, datasets.delete):
        with pytest.raises(InvalidInputError):
            call(_ref(), "bad", "a.png")
    with pytest.raises(InvalidInputError):
        datasets.clear(_ref(), "bad")


def test_meta_of_an_image_without_sidecar_is_not_found(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ok", [_item()])
    (_ok_dir(datasets) / saved).with_suffix(".json").unlink()
    with pytest.raises(NotFoundError, match="meta not found"):
        datasets.read_meta(_ref(), "ok", saved)


def test_meta_of_a_missing_image_is_not_found(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ok", [_item()])
    (_ok_dir(datasets) / saved).unlink()
    with pytest.raises(NotFoundError, match="meta not found"):
        datasets.read_meta(_ref(), "ok", saved)


def test_corrupt_sidecar_is_not_found_not_a_crash(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ok", [_item()])
    (_ok_dir(datasets) / saved).with_suffix(".json").write_text("{broken")
    with pytest.raises(NotFoundError, match="meta not found"):
        datasets.read_meta(_ref(), "ok", saved)
    (sample,) = datasets.samples(_ref(), "ok")
    assert sample.meta == {}


# ------------------------------------------------------------------------------------------ delete, clear


def test_delete_removes_image_and_sidecar_once(datasets: DatasetStore) -> None:
    (saved,) = datasets.save(_ref(), "ok", [_item()])
    assert datasets.delete(_ref(), "ok", saved) is True
    assert list(_ok_dir(datasets).iterdir()) == []
    assert datasets.delete(_ref(), "ok", saved) is False


def test_delete_without_a_dataset_is_false(datasets: DatasetStore) -> None:
    assert datasets.delete(_ref(), "ok", "a.png") is False


def test_clear_counts_images_and_sidecars(datasets: DatasetStore) -> None:
    datasets.save(_ref(), "ok", [_item(), _item(), _item()])
    datasets.save(_ref(), "ng", [_item()])
    assert datasets.clear(_ref(), "ok").cleared == 6
    assert datasets.listing(_ref())["classes"]["ok"]["count"] == 0
    assert datasets.counts(_ref()) == {"ok": 0, "ng": 1}


def test_clear_of_an_unknown_roi_or_label_dir_is_zero(datasets: DatasetStore) -> None:
    assert datasets.clear(_ref(), "ok").cleared == 0
    datasets.save(_ref(), "ok", [_item()])
    assert datasets.clear(_ref(), "ng").cleared == 0


def test_samples_are_sorted_with_their_meta(datasets: DatasetStore) -> None:
    saved = datasets.save(_ref(), "ng", [_item(meta={"mm_per_px": 0.2}), _item(meta={"mm_per_px": 0.3})])
    samples = datasets.samples(_ref(), "ng")
    assert [s.path.name for s in samples] == sorted(saved)
    assert all(s.label == "ng" for s in samples)
    assert sorted(s.meta["mm_per_px"] for s in samples) == [0.2, 0.3]
    assert datasets.samples(_ref(), "ok") == []


# ------------------------------------------------------------------------------------------ MVTec


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG)


def test_read_mvtec_reads_a_tiny_tree(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    for rel in ("train/good/000.png", "train/good/001.png", "test/good/010.png", "test/crack/020.png",
                "test/crack/021.png", "ground_truth/crack/020_mask.png", "test/crack/readme.txt"):
        _touch(root / rel)
    items = read_mvtec(root)
    assert [(i.split, i.label, i.defect_class, i.path.name) for i in items] == [
        ("train", "ok", "good", "000.png"),
        ("train", "ok", "good", "001.png"),
        ("test", "ng", "crack", "020.png"),
        ("test", "ng", "crack", "021.png"),
        ("test", "ok", "good", "010.png"),
    ]
    masks = {i.path.name: i.mask_path for i in items}
    assert masks["020.png"] == root / "ground_truth" / "crack" / "020_mask.png"
    assert masks["021.png"] is None and masks["010.png"] is None


def test_read_mvtec_of_a_missing_root_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=str(tmp_path / "nope")):
        read_mvtec(tmp_path / "nope")


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="magnetic_tile data not present")
def test_read_mvtec_reads_the_magnetic_tile_subset() -> None:
    items = read_mvtec(MAGNETIC_TILE)
    train = [i for i in items if i.split == "train"]
    test = [i for i in items if i.split == "test"]
    assert len(train) == 60 and all(i.label == "ok" for i in train)
    assert len(test) == 80
    assert sum(i.label == "ok" for i in test) == 20
    ng = [i for i in test if i.label == "ng"]
    assert len(ng) == 60
    assert all(i.mask_path is not None and i.mask_path.is_file() for i in ng)
