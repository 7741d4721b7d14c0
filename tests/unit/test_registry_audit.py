"""A model the registry follower swaps into the models dir is recorded in the audit trail (key ``registry``), with
the fingerprint and version it replaced and the ones it serves now."""

from __future__ import annotations

import json
from pathlib import Path

from bdi.mlops.follower import audit_changes
from bdi.mlops.registry_sync import SyncedModel, SyncReport
from bdi.refs import ModelRef
from bdi.security.audit import AuditLog, verify
from bdi.storage.store import ArtifactPaths


def test_a_swapped_model_is_audited_with_its_version_and_fingerprint_before_and_after(tmp_path: Path) -> None:
    ref = ModelRef(recipe_id="default", role_id="Inspection", roi_id="inspection-1", model_key="inspection-1")
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"threshold": 3.25}), encoding="utf-8")
    paths = ArtifactPaths(memory=tmp_path / "memory.npz", index=tmp_path / "index.faiss", calib=calib)
    swapped = SyncedModel(name="bdi.default.inspection-1", version=2, alias="champion", ref=ref, paths=paths,
                          fingerprint="new-fp", written=("memory", "calib"))
    unchanged = SyncedModel(name="bdi.default.other", version=1, alias="champion", ref=ref, paths=paths,
                            fingerprint="same", written=())
    previous = {"models": [{"recipe_id": "default", "role_id": "Inspection", "roi_id": "inspection-1",
                            "model_key": "inspection-1", "memory_fingerprint": "old-fp", "version": 1}]}
    log = AuditLog(tmp_path / "security")
    audit_changes(log, SyncReport(alias="champion", held=(swapped, unchanged)), previous=previous)
    [record] = log.records()
    assert record["key_id"] == "registry" and record["action"] == "registry.sync"
    assert record["before"] == {"memory_fingerprint": "old-fp", "version": 1}
    assert record["after"] == {"memory_fingerprint": "new-fp", "threshold": 3.25, "version": 2}
    assert verify(log.path).ok
