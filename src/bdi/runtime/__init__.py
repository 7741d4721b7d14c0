"""Exported feature nets, as anomalib's ``deploy/``: the ONNX/OpenVINO export (``export``), the parity
check against torch on golden images (``parity``), the runners that execute an export (``runners``) and
the choice of runtime for a model (``select``).

May import :mod:`bdi.patchcore`, :mod:`bdi.storage.fsio` and the golden images' generator
:mod:`bdi.data.synthetic`; knows no MLflow and no HTTP.
"""
