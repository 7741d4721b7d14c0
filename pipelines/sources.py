"""Which folder the ingest stage reads, by ``dataset.kind``, and the synthetic discs it generates.

* ``mvtec``: ``dataset.source`` in MVTec layout (``train/good``, ``test/<class>``, ``ground_truth/``);
* ``server``: the GUI's ``ok``/``ng`` samples in the DatasetStore folders under ``dataset.source`` (a models dir);
* ``synthetic``: seeded synthetic discs (``bdi.data.synthetic.write_mvtec_dataset``, ``dataset.synthetic.*``)
  that ingest writes into ``dataset.source`` when the folder is missing or was generated with other settings
  (a stamp file records them); a folder that ingest did not generate is read as it is, never overwritten;
* ``auto`` (the default, ``conf/dataset/auto.yaml``): ``server`` when every model of ``dataset.rois`` has at
  least ``AUTO_MIN_OK`` OK samples under ``dataset.source``, else ``synthetic`` into ``dataset.synthetic.folder``.

So a fresh clone has a dataset: the pipeline needs no download and no ``../shared``. The ingest report records
which source was used and why, and the generator settings and seed when discs were generated.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bdi.digest import file_sha256
from pipelines.config import PipelineConfig, PipelineConfigError
from pipelines.rows import resolve_path, targets

log = logging.getLogger("pipelines.sources")

AUTO_MIN_OK = 4  # OK samples per model for `auto` to train on the server's samples (train, calib and eval)
STAMP = ".bdi-synthetic.json"  # in a generated folder: the generator, its settings and seed
GENERATOR = "bdi.data.synthetic.write_mvtec_dataset"


@dataclass(frozen=True)
class Source:
    """The folder ingest lists and how: ``layout`` ``mvtec`` or ``server``; ``used`` says what it holds."""

    folder: Path
    layout: str  # mvtec | server
    used: str  # mvtec | server | synthetic
    note: str
    generator: dict[str, Any] | None = None  # the stamp of generated discs

    def report(self, root: Path) -> dict[str, Any]:
        return {"used": self.used, "folder": rel_path(self.folder, root), "note": self.note,
                "generator": self.generator}


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to the project root when possible (``../`` allowed), POSIX separators."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.as_posix()


def missing_folder_error(cfg: PipelineConfig, folder: Path) -> PipelineConfigError:
    """The error of a dataset folder that does not exist: which folder, and the overrides that fix it."""
    what = ("a models dir with the server's DatasetStore folders" if cfg.dataset.kind == "server" else
            "a folder in MVTec layout (train/good, test/<class>, ground_truth/<class>/<stem>_mask.png)")
    return PipelineConfigError(
        f"dataset.source: folder '{cfg.dataset.source}' does not exist (dataset={cfg.dataset.name}, resolved to "
        f"{folder}). Point it at {what}: `dvc exp run -S dataset.source=/path/to/folder` (a stage by hand: "
        "python -m pipelines.ingest dataset.source=PATH), or train on the generated synthetic discs: "
        "`dvc exp run -S dataset=synthetic` (or the default, `-S dataset=auto`)"
    )


def check_source(cfg: PipelineConfig, *, root: Path) -> Path:
    """The configured folder; for ``mvtec``/``server`` a missing one is an error naming the fix (the other
    kinds generate theirs)."""
    folder = resolve_path(root, cfg.dataset.source)
    if cfg.dataset.kind in ("mvtec", "server") and not folder.is_dir():
        raise missing_folder_error(cfg, folder)
    return folder


def server_ok_counts(cfg: PipelineConfig, folder: Path) -> dict[str, int]:
    """OK samples per model (``Target.key``) in the DatasetStore under ``folder``."""
    from bdi.refs import DatasetRef
    from bdi.storage.datasets import DatasetStore

    store = DatasetStore(folder)
    counts: dict[str, int] = {}
    for target in targets(cfg):
        ref = DatasetRef(recipe_id=target.ref.recipe_id, role_id=target.ref.role_id, roi_id=target.ref.roi_id)
        counts[target.key] = len(store.samples(ref, "ok")) if folder.is_dir() else 0
    return counts


def synthetic_stamp(cfg: PipelineConfig) -> dict[str, Any]:
    """What a generated folder was made with: the generator, its code's sha256, settings and seed."""
    from bdi.data import synthetic

    settings = asdict(cfg.dataset.synthetic)
    settings.pop("folder", None)
    return {"generator": GENERATOR, "code_sha256": file_sha256(Path(synthetic.__file__)), **settings}


def ensure_synthetic(cfg: PipelineConfig, folder: Path) -> tuple[dict[str, Any] | None, str]:
    """Generate the discs into ``folder`` unless it holds them already; returns ``(stamp, note)``, the stamp
    None for a folder that ingest did not generate (read as it is)."""
    from bdi.data.synthetic import write_mvtec_dataset

    stamp = synthetic_stamp(cfg)
    stamp_path = folder / STAMP
    if folder.is_dir() and any(folder.iterdir()):
        if not stamp_path.is_file():
            return None, f"{folder} exists without {STAMP}: read as it is, not generated"
        try:
            if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
                return stamp, "synthetic discs generated earlier with these settings: reused"
        except (OSError, ValueError):
            pass
        note = "synthetic discs regenerated (settings or generator changed)"
    else:
        note = "synthetic discs generated"
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    s = cfg.dataset.synthetic
    write_mvtec_dataset(tmp, n_train=s.n_train, n_test_good=s.n_test_good, n_test_per_defect=s.n_test_per_defect,
                        size=s.size, seed=s.seed)
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    log.info("%s into %s (seed %d)", note, folder, s.seed)
    return stamp, note


def resolve_source(cfg: PipelineConfig, *, root: Path) -> Source:
    """The folder to list for ``cfg.dataset.kind``, generating synthetic discs where the kind says so."""
    kind = cfg.dataset.kind
    folder = check_source(cfg, root=root)
    if kind == "mvtec":
        return Source(folder=folder, layout="mvtec", used="mvtec", note="dataset.source (MVTec layout)")
    if kind == "server":
        return Source(folder=folder, layout="server", used="server", note="dataset.source (server samples)")
    if kind == "auto":
        counts = server_ok_counts(cfg, folder)
        if all(n >= AUTO_MIN_OK for n in counts.values()):
            return Source(folder=folder, layout="server", used="server",
                          note=f"auto: the server's samples under {cfg.dataset.source} (OK per model: {counts})")
        folder = resolve_path(root, cfg.dataset.synthetic.folder)
        why = f"auto: fewer than {AUTO_MIN_OK} OK server samples per model under {cfg.dataset.source} ({counts})"
    else:
        why = "dataset.kind synthetic"
    stamp, note = ensure_synthetic(cfg, folder)
    return Source(folder=folder, layout="mvtec", used="synthetic" if stamp else "mvtec", note=f"{why}; {note}",
                  generator=stamp)


def ingested_folder(cfg: PipelineConfig, *, root: Path) -> Path:
    """The folder the last ingest read (its report's ``source``: for ``auto``, the server's or the generated
    one), else ``dataset.source``."""
    try:
        folder = json.loads(resolve_path(root, cfg.paths.ingest_report).read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError, TypeError):
        folder = cfg.dataset.source
    return resolve_path(root, str(folder))
