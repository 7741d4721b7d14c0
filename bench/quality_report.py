"""The quality benchmark's results as markdown (the table docs/quality.md quotes) and strict JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MAIN_COLUMNS = (
    ("image AUROC", "metrics.image_auroc", 3),
    ("pixel AUROC", "metrics.pixel_auroc", 3),
    ("AUPRO", "metrics.aupro", 3),
    ("false reject", "metrics.false_reject_rate", 3),
    ("escape", "metrics.escape_rate", 3),
    ("fit: features s", "fit.features_s", 1),
    ("fit: coreset s", "fit.coreset_s", 1),
    ("fit: total s", "fit.total_s", 1),
    ("/infer p50 ms", "latency_ms.p50", 0),
)


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


FOLD_COLUMNS = (
    ("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("AUPRO", "aupro"),
    ("false reject", "false_reject_rate"), ("escape", "escape_rate"),
    ("FRR @ 0 % escapes", "frr_at_escape_0"), ("FRR @ 5 % escapes", "frr_at_escape_5"),
    ("band: escape", "band_escape_rate"), ("band: false reject", "band_false_reject_rate"),
    ("band: to review", "review_rate"),
)


def fmt_ci(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``value [lo, hi]`` (the 95 % interval), ``value`` without one, ``–`` without a value."""
    if not entry or entry.get("value") is None:
        return "–"
    ci = entry.get("ci")
    text = fmt(entry["value"], digits)
    return f"{text} [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci else text


def fold_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Both folds and their mean, each figure with its 95 % interval; then the paired comparisons."""
    done = [r for r in rows if r["status"] == "ok" and r.get("folds")]
    if not done:
        return []
    table = []
    for r in done:
        folds = r["folds"]
        for label, values in (("fold 1", folds["folds"][0]), ("fold 2", folds["folds"][1]), ("mean", folds["mean"])):
            table.append([r["label"] if label == "fold 1" else "", label,
                          *(fmt_ci(values.get(key)) for _, key in FOLD_COLUMNS)])
    lines = ["Both folds (fold 1: calibrate on the calib half, report on the eval half; fold 2: swapped) and their "
             "mean, with 95 % bootstrap intervals:", ""]
    lines += _table(["row", "fold", *(c[0] for c in FOLD_COLUMNS)], table)
    lines.append("")
    for r in done:
        for other, diffs in r.get("comparisons", {}).items():
            lines += [f"{r['label']} minus {other} (fold means, paired bootstrap; 'better' only where the 95 % "
                      "interval of the difference excludes 0):", ""]
            lines += _table(["figure", "difference [95 % interval]", "verdict for BDI"],
                            [[name, fmt_ci({"value": diffs[key]["diff"], "ci": diffs[key]["ci"]}),
                              diffs[key]["verdict"]] for name, key in FOLD_COLUMNS if key in diffs])
            lines.append("")
    return lines


def per_class_lines(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> list[str]:
    """Image AUROC, pixel AUROC and AUPRO per defect class (that class with the good images), each half."""
    lines = ["Per defect class (that class with the good images; image AUROC / pixel AUROC / AUPRO; eval half = fold "
             "1's reporting half, calib half = fold 2's):", ""]
    body = []
    for r in rows:
        for half, key in (("eval", "per_class"), ("calib", "per_class_calib")):
            if key not in r:
                continue
            body.append([r["label"], half, *(" / ".join(fmt(_get(r[key], f"{c}.{m}"))
                                                       for m in ("image_auroc", "pixel_auroc", "aupro"))
                                             for c in classes)])
    return [*lines, *_table(["row", "half", *classes], body), ""]


def _counts_text(counts: Mapping[str, Mapping[str, int]]) -> str:
    parts = []
    for split, per_class in counts.items():
        total = sum(per_class.values())
        good = per_class.get("good", 0)
        parts.append(f"{split} {total}" + (f" ({good} good, {total - good} NG)" if total != good else ""))
    return ", ".join(parts)


def render_markdown(results: Mapping[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Quality benchmark: BDI side by side with anomalib",
        "",
        f"`{results['command']}` ({results['mode']} run, {results['created_utc']}, {results['wall_s']:.0f} s wall).",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable cores; {m['threads']} threads for every row "
        f"(torch, faiss, OpenCV; OMP_WAIT_POLICY={m.get('omp_wait_policy')}); torch {m['torch']}, timm {m['timm']}, "
        f"faiss {m['faiss']}, "
        f"anomalib {m['anomalib'] or 'not installed'}, Python {m['python']}. Load average (1 min) "
        f"{fmt(m['load_before'], 1)} before the run, {fmt(m['load_after'], 1)} after it (the machine is shared: "
        "timings are only comparable within one run).",
        "",
        f"Split: {results['split_rule']}",
        "",
    ]
    for dataset in results["datasets"]:
        lines += [f"## {dataset['name']}", "", f"Source: `{dataset['source']}`; {_counts_text(dataset['counts'])}.", ""]
        rows = dataset["rows"]
        done = [r for r in rows if r["status"] == "ok"]
        header = ["row", *(c[0] for c in MAIN_COLUMNS)]
        lines += _table(header, [[r["label"], *(fmt(_get(r, key), d) for _, key, d in MAIN_COLUMNS)] for r in done])
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"\n*{r['label']}*: {r['status']}: {r.get('reason', '')}")
        lines.append("")
        lines += fold_lines(rows)
        classes = sorted({c for r in done for c in r.get("per_class", {})})
        if classes:
            lines += per_class_lines(done, classes)
        lines += ["What each row ran:", ""]
        lines += _table(
            ["row", "backbone / weights", "input", "layers", "coreset", "memory", "threshold"],
            [[r["label"], f"{fmt(r['config'].get('backbone'))} / {fmt(r['config'].get('weights'))}",
              f"{fmt(r['config'].get('input_size'))} px, {r['config'].get('preprocessing', '')}",
              " + ".join(str(x) for x in r["config"].get("layers", [])),
              f"{fmt(r['config'].get('coreset_rate'), 2)} of {r['fit']['n_patches']}",
              str(r["fit"]["memory_size"]), fmt(r["threshold"], 4)] for r in done],
        )
        lines.append("")
        if dataset.get("targets"):
            lines += ["Targets of issue 14:", ""]
            lines += _table(["target", "measured", "met"],
                            [[t["target"], t["measured"], fmt(t["met"])] for t in dataset["targets"]])
            lines.append("")
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"* {note}" for note in results["notes"]] + [""]
    return "\n".join(lines)


def write_results(results: Mapping[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.md`` and ``<stem>.json`` (strict: NaN refused) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    js = out_dir / f"{stem}.json"
    md.write_text(render_markdown(results), encoding="utf-8")
    js.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return md, js
