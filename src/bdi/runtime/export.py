"""Export a feature extractor's net to files that other runtimes run: ONNX, and OpenVINO IR.

An export is a folder ``<exports root>/<key>/`` holding ``features.onnx`` (opset 17, input ``pixels``
``(B, 3, S, S)`` float32 normalised, output ``features`` ``(B, Ht*Wt, D)`` float32, batch dynamic, side
``S`` fixed to the extractor's input size), ``features.xml``/``.bin`` when OpenVINO is installed, and
``export.json`` (:class:`ExportManifest`: the extractor signature, each file's sha256, versions, and the
parity reports made when it was written). ``key`` hashes the extractor signature (backbone, size,
blocks, weights sha256 …), so one export serves every memory fitted with that extractor, and a folder
can be shared by servers and pipeline runs on one machine (the cache: ``Settings.exports_dir()``,
``<BDI_WEIGHTS_CACHE_DIR>/exports``) or shipped inside a registered model version (``<model dir>/exports``).

``runtime_choice.json`` next to them records what ``BDI_RUNTIME=auto`` chose for this export (per precision and
device): the first process to time the candidates writes it under the export lock and every later worker, restart
and replica reads it instead of timing again, so one model scores the same whichever process answers
(:func:`record_runtime_choice`, ``bdi.runtime.select``). Re-exporting replaces the folder and so the choice.

Writes are atomic (a temp folder renamed into place) and serialised per key by a file lock. torch is
imported lazily; openvino only when present. Nothing here decides whether an export may be used:
``bdi.runtime.parity`` does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bdi.digest import file_sha256
from bdi.errors import ExportError
from bdi.storage.fsio import atomic_write_json, exclusive_lock, staged_dir, utc_now_iso

if TYPE_CHECKING:  # pragma: no cover - typing only
    from bdi.patchcore.features import FeatureExtractor

EXPORT_FORMAT = 1  # bump when the files or their meaning change: old exports get a new key
OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "features"
ONNX_FILE = "features.onnx"
OPENVINO_XML = "features.xml"
OPENVINO_BIN = "features.bin"
MANIFEST_FILE = "export.json"
CHOICE_FILE = "runtime_choice.json"
LOCK_TIMEOUT_S = 600.0


def export_key(signature: Mapping[str, Any]) -> str:
    """16 hex of the extractor signature (+ :data:`EXPORT_FORMAT`): equal keys, interchangeable exports."""
    blob = json.dumps({"signature": dict(signature), "format": EXPORT_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@dataclass(frozen=True)
class ExportManifest:
    """``export.json``: what an export folder holds and what it was checked against.

    Attributes:
        key: :func:`export_key` of ``signature``.
        signature: ``FeatureExtractor.signature()`` of the exported extractor.
        input_size: the fixed side ``S`` of the input.
        files: file name → sha256 (``features.onnx``, and the OpenVINO IR pair when written).
        parity: runtime name → ``ParityReport.to_dict()`` from the check made when it was written.
    """

    key: str
    signature: dict[str, Any]
    input_size: int
    opset: int
    files: dict[str, str]
    torch_version: str
    openvino_version: str | None
    created_at_utc: str
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: int = EXPORT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExportManifest:
        try:
            return cls(
                key=str(raw["key"]), signature=dict(raw["signature"]), input_size=int(raw["input_size"]),
                opset=int(raw["opset"]), files={str(k): str(v) for k, v in dict(raw["files"]).items()},
                torch_version=str(raw["torch_version"]),
                openvino_version=None if raw.get("openvino_version") is None else str(raw["openvino_version"]),
                created_at_utc=str(raw["created_at_utc"]), parity=dict(raw.get("parity") or {}),
                format=int(raw.get("format", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"export manifest is malformed: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Export:
    """An export folder whose manifest and files have been checked (:func:`load_export`)."""

    path: Path
    manifest: ExportManifest

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def openvino_path(self) -> Path | None:
        """The IR ``.xml`` when written, else None (OpenVINO then reads the ONNX file)."""
        return self.path / OPENVINO_XML if OPENVINO_XML in self.manifest.files else None


def load_export(folder: Path, *, signature: Mapping[str, Any] | None = None, verify: bool = True) -> Export:
    """Read ``folder/export.json`` and check the export against it.

    Raises:
        ExportError: no or malformed manifest, another format, a signature other than ``signature``,
            a missing file, or (``verify``) a file whose sha256 differs from the manifest's.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ExportError(f"no export in {folder} ({MANIFEST_FILE} is missing)") from exc
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ExportError(f"{path} does not hold an object")
    manifest = ExportManifest.from_dict(raw)
    if manifest.format != EXPORT_FORMAT:
        raise ExportError(f"{path} is export format {manifest.format}, this bdi reads {EXPORT_FORMAT}: export again")
    if signature is not None and manifest.signature != json.loads(json.dumps(dict(signature), default=str)):
        raise ExportError(f"the export in {folder} was made for another extractor: {manifest.signature}")
    if ONNX_FILE not in manifest.files:
        raise ExportError(f"{path} lists no {ONNX_FILE}")
    for name, sha in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise ExportError(f"export file {file} is missing")
        if verify and file_sha256(file) != sha:
            raise ExportError(f"export file {file} does not have the sha256 its manifest records: corrupt or edited")
    return Export(path=folder, manifest=manifest)


def write_onnx(extractor: FeatureExtractor, path: Path) -> None:
    """Trace ``extractor.net`` at its fixed input size into an ONNX file (TorchScript exporter, opset 17).

    The graph runs in float32 whatever the extractor's autocast precision; the batch axis is dynamic.
    """
    import torch
    from torch.jit._trace import TracerWarning

    side = int(extractor.config.input_size or 0)
    net = extractor.net
    device = next(net.parameters()).device
    dummy = torch.zeros(1, 3, side, side, dtype=torch.float32, device=device)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # timm's shape asserts are constants at the fixed input size: the tracer's warning about them is moot
            warnings.simplefilter("ignore", category=TracerWarning)
            torch.onnx.export(
                net, (dummy,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as exc:  # noqa: BLE001 - exporter failures come as many types (onnx missing, unsupported op)
        hint = " (install the 'runtime' extra: pip install 'bdi[runtime]')" if isinstance(exc, ImportError) else ""
        raise ExportError(f"ONNX export of {extractor.config.backbone} failed: {type(exc).__name__}: {exc}"
                          f"{hint}") from exc


def write_openvino(onnx_path: Path, xml_path: Path) -> str:
    """Convert the ONNX file to OpenVINO IR (weights kept in fp32); returns the OpenVINO version."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise ImportError("openvino is missing: install the 'runtime' extra (pip install 'bdi[runtime]')") from exc

    try:  # the ONNX frontend directly: same graph as ov.convert_model, without its seconds of tool loading
        model = ov.Core().read_model(str(onnx_path))
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001 - conversion errors are runtime-specific types
        raise ExportError(f"OpenVINO conversion of {onnx_path.name} failed: {type(exc).__name__}: {exc}") from exc
    return str(ov.get_version())


def write_export(extractor: FeatureExtractor, dest: Path, *, openvino: bool | None = None) -> Export:
    """Export ``extractor`` into the folder ``dest`` (replaced atomically when it exists).

    ``openvino``: also write the IR (default: when OpenVINO is installed). No parity here; callers
    check the export (``bdi.runtime.select.export_checked``) and record the reports with
    :func:`record_parity`.
    """
    import torch

    dest = Path(dest)
    with staged_dir(dest) as staging:
        staging.mkdir()
        write_onnx(extractor, staging / ONNX_FILE)
        files = {ONNX_FILE: file_sha256(staging / ONNX_FILE)}
        ov_version = None
        if openvino if openvino is not None else openvino_installed():
            ov_version = write_openvino(staging / ONNX_FILE, staging / OPENVINO_XML)
            files[OPENVINO_XML] = file_sha256(staging / OPENVINO_XML)
            files[OPENVINO_BIN] = file_sha256(staging / OPENVINO_BIN)
        signature = json.loads(json.dumps(extractor.signature(), default=str))
        manifest = ExportManifest(
            key=export_key(signature), signature=signature, input_size=int(extractor.config.input_size or 0),
            opset=OPSET, files=files, torch_version=str(torch.__version__), openvino_version=ov_version,
            created_at_utc=utc_now_iso(),
        )
        atomic_write_json(staging / MANIFEST_FILE, manifest.to_dict())
    return Export(path=dest, manifest=manifest)


def record_parity(export: Export, reports: Mapping[str, Mapping[str, Any]]) -> Export:
    """Store the parity reports in the export's manifest (atomically); returns the updated export."""
    parity = {name: dict(report) for name, report in reports.items()}
    manifest = ExportManifest.from_dict({**export.manifest.to_dict(), "parity": parity})
    atomic_write_json(export.path / MANIFEST_FILE, manifest.to_dict())
    return Export(path=export.path, manifest=manifest)


def read_runtime_choice(export: Export, *, choice_key: str) -> dict[str, Any] | None:
    """The choice recorded for ``choice_key`` in the export's ``runtime_choice.json``; None when there is none (or
    the file is unreadable: then it is chosen, and written, again)."""
    try:
        raw = json.loads((export.path / CHOICE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = raw.get(choice_key) if isinstance(raw, dict) else None
    return dict(entry) if isinstance(entry, dict) and isinstance(entry.get("runtime"), str) else None


def record_runtime_choice(export: Export, *, root: Path, choice_key: str, choice: Mapping[str, Any]
                          ) -> tuple[dict[str, Any], bool]:
    """Record ``choice`` for ``choice_key`` unless another process recorded one first: the choice that holds, and
    whether this call wrote it.

    Raises:
        ExportError: the export lock was not obtained, or the file cannot be written.
    """
    with export_lock(Path(root), export.manifest.key):
        existing = read_runtime_choice(export, choice_key=choice_key)
        if existing is not None:
            return existing, False  # first writer wins
        path = export.path / CHOICE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        entries = raw if isinstance(raw, dict) else {}
        entries[choice_key] = {**dict(choice), "recorded_at_utc": utc_now_iso()}
        try:
            atomic_write_json(path, entries)
        except OSError as exc:
            raise ExportError(f"cannot record the runtime choice in {path}: {exc}") from exc
        return dict(entries[choice_key]), True


@contextmanager
def export_lock(root: Path, key: str) -> Iterator[None]:
    """Serialise the writers of ``root/key`` across processes (two workers starting at once export once).

    Raises:
        ExportError: the lock was not obtained within :data:`LOCK_TIMEOUT_S`, or the folder cannot be written.
    """
    lock_file = Path(root) / f".{key}.lock"
    with exclusive_lock(
        lock_file, timeout_s=LOCK_TIMEOUT_S,
        busy=lambda: ExportError(f"timed out waiting for {lock_file}: another process is exporting"),
        unusable=lambda exc: ExportError(f"cannot take the export lock in the exports folder {root}: {exc}"),
    ):
        yield


def copy_export(*, src_root: Path, dst_root: Path, key: str) -> bool:
    """Copy the export ``key`` from one exports root to another when the target lacks a valid one.

    Returns True when files were copied. The source is verified first; the copy lands atomically.
    """
    source = load_export(Path(src_root) / key)
    target = Path(dst_root) / key
    with export_lock(Path(dst_root), key):
        try:
            load_export(target, signature=source.manifest.signature)
            return False
        except ExportError:
            pass
        with staged_dir(target) as staging:
            shutil.copytree(source.path, staging)
    return True
