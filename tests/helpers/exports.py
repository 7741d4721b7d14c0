"""Make an export whose numbers differ from torch, as a buggy exporter would (the case parity exists for)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bdi.runtime.export import MANIFEST_FILE, ONNX_FILE, OPENVINO_BIN, OPENVINO_XML


def perturb_export(folder: Path, *, factor: float = 1.5) -> None:
    """Scale the weights of the first convolution (the ViT's patch embedding, the CNN's stem) in
    ``features.onnx`` by ``factor``, drop the OpenVINO IR (so OpenVINO reads the perturbed ONNX too) and
    rewrite the manifest's hashes: a self-consistent export that is wrong."""
    path = folder / ONNX_FILE
    model = onnx.load(str(path))
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    target = next(t for t in model.graph.initializer if t.name == conv.input[1])
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(factor), target.name))
    onnx.save(model, str(path))
    manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    for name in (OPENVINO_XML, OPENVINO_BIN):
        (folder / name).unlink(missing_ok=True)
        manifest["files"].pop(name, None)
    manifest["files"][ONNX_FILE] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
