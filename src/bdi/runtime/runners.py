"""Runners of an exported feature net: ONNX Runtime and OpenVINO.

Each runner is a :class:`bdi.patchcore.features.ForwardRuntime`: normalised ``(B, 3, S, S)`` float32 in,
``(B, Ht*Wt, D)`` float32 out, exactly what ``FeatureExtractor.net`` computes (within the parity
tolerance, which ``bdi.runtime.parity`` checks before a runner is used). Both libraries are imported lazily,
so a machine without them still serves on torch.

* ONNX Runtime: ``intra_op_num_threads`` = the process's thread budget, one inter-op thread, all
  graph optimisations, no spin-waiting (a spinning pool steals the cores of the other workers). On a CUDA
  device it takes the TensorRT (fp16 when the precision asks for it) and CUDA execution providers when
  the installed build has them (``onnxruntime-gpu``), the CPU provider otherwise.
* OpenVINO: the IR (or the ONNX file) compiled for the CPU with a latency hint and the thread budget;
  bf16 inference where the CPU has it (``OPTIMIZATION_CAPABILITIES``) and the precision allows it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bdi.errors import ExportError
from bdi.runtime.export import Export

RuntimeName = Literal["onnxruntime", "openvino"]
RUNTIMES: tuple[RuntimeName, ...] = ("onnxruntime", "openvino")
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def runtime_installed(name: str) -> bool:
    """Whether the Python package of runtime ``name`` can be imported."""
    module = _MODULES.get(name)
    return module is not None and importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class RuntimeOptions:
    """How a runner runs: intra-op ``threads``, ``device`` (``cpu``/``cuda``) and the extractor's ``precision``
    (``fp32``/``bf16``/``fp16``): reduced precision is only used where it was asked for or is the device's
    default (``fp16`` on CUDA), and parity still has the last word."""

    threads: int
    device: str = "cpu"
    precision: str = "fp32"


class OnnxRuntimeRunner:
    """An ONNX Runtime session over ``features.onnx``."""

    def __init__(self, onnx_path: Path, *, options: RuntimeOptions) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("onnxruntime is missing: pip install 'bdi[runtime]' (the 'runtime' extra)") from exc

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = max(1, options.threads)
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session_options.log_severity_level = 3  # errors only
        self.providers = self._providers(options, available=set(ort.get_available_providers()))
        try:
            self._session = ort.InferenceSession(str(onnx_path), session_options, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {type(exc).__name__}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self.precision = "fp16" if any(_is_fp16(p) for p in self.providers) else "fp32"

    @property
    def name(self) -> str:
        return "onnxruntime"

    @staticmethod
    def _providers(options: RuntimeOptions, *, available: set[str]) -> list[Any]:
        providers: list[Any] = []
        if options.device.startswith("cuda"):
            if "TensorrtExecutionProvider" in available:
                providers.append(("TensorrtExecutionProvider", {"trt_fp16_enable": options.precision == "fp16"}))
            if "CUDAExecutionProvider" in available:
                providers.append("CUDAExecutionProvider")
        providers.append("CPUExecutionProvider")
        return providers

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"providers": [p if isinstance(p, str) else p[0] for p in self.providers], "precision": self.precision}


def _is_fp16(provider: Any) -> bool:
    return isinstance(provider, tuple) and bool(provider[1].get("trt_fp16_enable"))


class OpenVinoRunner:
    """An OpenVINO model compiled for the CPU (one infer request; callers serialise ``run``)."""

    def __init__(self, model_path: Path, *, options: RuntimeOptions) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise ImportError("openvino is missing: install the 'runtime' extra (pip install 'bdi[runtime]')") from exc

        core = ov.Core()
        capabilities = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        self.precision = "bf16" if options.precision in ("bf16", "fp16") and "BF16" in capabilities else "fp32"
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": max(1, options.threads),
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
        }
        try:
            self._compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - openvino raises its own exception types
            raise ExportError(f"OpenVINO cannot load {model_path}: {type(exc).__name__}: {exc}") from exc
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)

    @property
    def name(self) -> str:
        return "openvino"

    def run(self, batch: np.ndarray) -> np.ndarray:
        # share_outputs=False (the default): the result is a copy, not the request's reused buffer
        result = self._request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)
        return np.asarray(result[self._output], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"device": "CPU", "precision": self.precision}


Runner = OnnxRuntimeRunner | OpenVinoRunner


def open_runtime(name: str, export: Export, *, options: RuntimeOptions) -> Runner:
    """A runner of ``export`` on runtime ``name``.

    Raises:
        ExportError: an unknown or uninstalled runtime, or one that cannot load the export.
    """
    if name not in RUNTIMES:
        raise ExportError(f"unknown runtime {name!r}; known: {list(RUNTIMES)} (and torch)")
    if not runtime_installed(name):
        raise ExportError(f"runtime {name!r} is not installed: `pip install {name}`")
    if name == "onnxruntime":
        return OnnxRuntimeRunner(export.onnx_path, options=options)
    return OpenVinoRunner(export.openvino_path or export.onnx_path, options=options)
