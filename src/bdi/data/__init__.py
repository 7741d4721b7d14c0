"""Offline datasets and metrics: the MVTec reader (``mvtec``), sample checks (``checks``), calibration and
evaluation splits (``splits``), the seeded synthetic disc generator (``synthetic``), metrics (``metrics``:
AUROC, AUPRO, rates) and their plots (``plots``).
"""
