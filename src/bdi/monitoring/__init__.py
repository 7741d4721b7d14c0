"""Monitoring of served models (docs/monitoring.md): the inspection record of every ``/infer`` decision, the
image statistics it carries, drift per ROI against the calibration's reference, and operator feedback."""
