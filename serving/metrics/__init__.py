"""Prometheus metrics of the server (docs/metrics.md): the per-launch multiprocess folder (:mod:`.folder`), the
instruments (:mod:`.families`), the request counter middleware (:mod:`.http`) and what ``GET /metrics`` renders
(:mod:`.exposition`)."""
