"""One side-by-side table of the peer benchmarks: trioworker, Prefect 3, SAQ (issue 5).

Reads ``benchmarks/results/peers-{trioworker,prefect,saq}.json`` (written by the
``run_*.py`` scripts beside this file), prints the table with trioworker/peer ratios and
writes it, with every system's raw results, to ``benchmarks/results/peers.json``::

    python benchmarks/peers/compare.py [--results DIR] [--output FILE]

Standard library only (it runs with any Python 3.11+). A ratio is trioworker's value over
the peer's: above 1 is better for trioworker in a "higher is better" row (runs/s), below 1
is better in a "lower is better" row (ms, MB). The exit code is 1 when a system's results
are missing, or it failed or left a phase with an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
SYSTEMS = ("trioworker", "prefect", "saq")
TITLES = {"trioworker": "trioworker", "prefect": "Prefect", "saq": "SAQ"}
PEERS = ("prefect", "saq")
MAX_LOG_ISSUES = 8
WORKLOAD_PHASES = ("drain10", "drain100", "e2e", "roundtrip", "steady", "sleep10", "sleep100")


@dataclass(frozen=True)
class Row:
    label: str
    phase: str | None  # None: computed
    field: str
    unit: str
    higher_is_better: bool


ROWS: tuple[Row, ...] = (
    Row("(a) drain, limit 10", "drain10", "rate", "runs/s", True),
    Row("(a) drain, limit 100", "drain100", "rate", "runs/s", True),
    Row("(b) submit N + await all, limit 100", "e2e", "rate", "runs/s", True),
    Row("(c) round trip p50", "roundtrip", "p50_ms", "ms", False),
    Row("(c) round trip p95", "roundtrip", "p95_ms", "ms", False),
    Row("(c) round trip p99", "roundtrip", "p99_ms", "ms", False),
    Row("(d) steady load p50", "steady", "p50_ms", "ms", False),
    Row("(d) steady load p95", "steady", "p95_ms", "ms", False),
    Row("(d) steady load p99", "steady", "p99_ms", "ms", False),
    Row("(e) 50 ms sleeps, limit 10 (ideal 200/s)", "sleep10", "rate", "runs/s", True),
    Row("(e) 50 ms sleeps, limit 100 (ideal 2,000/s)", "sleep100", "rate", "runs/s", True),
    Row("(f) worker peak RSS, phases a-e", None, "worker_rss_mb", "MB", False),
    Row("(f) server peak RSS, phases a-e", None, "server_rss_mb", "MB", False),
    Row("(g) drain, 1,000 queued", "scale_small", "rate", "runs/s", True),
    Row("(g) drain first 1,000 of 100,000 queued", "scale_large", "head_rate", "runs/s", True),
    Row("(g) drain first 10,000 of 100,000 queued", "scale_large", "rate", "runs/s", True),
    Row("(g) server peak RSS, 100,000 queued", "scale_large", "server_rss_mb", "MB", False),
    Row("(g) worker peak RSS, 100,000 queued", "scale_large", "worker_rss_mb", "MB", False),
)


def load(results: Path) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for system in SYSTEMS:
        path = results / f"peers-{system}.json"
        try:
            out[system] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[system] = None
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


def value_of(data: dict[str, Any] | None, row: Row) -> tuple[float | None, str]:
    """(value, note): the note says n=, or why there is no value."""
    if data is None:
        return None, "no results"
    phases = data.get("phases", {})
    if row.phase is None:  # the peak over the workload phases
        values = [
            phases[p][row.field]
            for p in WORKLOAD_PHASES
            if p in phases and is_number(phases[p].get(row.field))
        ]
        return (max(values), "") if values else (None, "n/a")
    if row.phase in data.get("errors", {}):
        return None, "failed"
    if row.phase in data.get("skipped", {}):
        return None, "skipped"
    result = phases.get(row.phase)
    if result is None:
        return None, "not run" if data.get("status") != "running" else "cut off"
    value = result.get(row.field)
    if not is_number(value):
        return None, "n/a"
    return float(value), run_note(row, result)


def run_note(row: Row, result: dict[str, Any]) -> str:
    if row.unit == "MB":
        return ""
    parts = []
    if row.phase == "steady":
        per_second = max(1, int(result.get("target_rate", 1)))
        parts.append(f"{per_second}/s x {int(result.get('runs', 0)) // per_second} s")
    elif row.field == "head_rate":
        parts.append(f"{short(result['head_runs'])} of {short(result['queued'])}")
    elif "queued" in result and result.get("queued") != result.get("runs"):
        parts.append(f"{short(result['runs'])} of {short(result['queued'])}")
    else:
        parts.append(f"n={short(result.get('runs', 0))}")
    if result.get("lost_runs"):
        parts.append(f"{result['lost_runs']} lost")
    return ", ".join(parts)


def short(n: int) -> str:
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000:,}k"
    return f"{n:,}"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "ms":
        return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    if unit == "MB":
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def ratio(tw: float | None, peer: float | None) -> float | None:
    if tw is None or peer is None or peer == 0:
        return None
    return tw / peer


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def build(data: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for row in ROWS:
        values: dict[str, float | None] = {}
        notes: dict[str, str] = {}
        for system in SYSTEMS:
            values[system], notes[system] = value_of(data[system], row)
        rows.append(
            {
                "metric": row.label,
                "unit": row.unit,
                "better": "higher" if row.higher_is_better else "lower",
                "values": values,
                "notes": notes,
                "ratios": {f"trioworker/{p}": ratio(values["trioworker"], values[p]) for p in PEERS},
            }
        )
    # (g) how much the drain rate of the first 1,000 changes from 1,000 queued to 100,000, per system
    small = next(r for r in rows if r["metric"] == "(g) drain, 1,000 queued")
    large = next(r for r in rows if r["metric"] == "(g) drain first 1,000 of 100,000 queued")
    change: dict[str, float | None] = {s: ratio(large["values"][s], small["values"][s]) for s in SYSTEMS}
    rows.insert(
        rows.index(large) + 1,
        {
            "metric": "(g) first 1,000: rate with 100,000 / with 1,000 queued",
            "unit": "x",
            "better": "higher",
            "values": change,
            "notes": {s: "" if change[s] is not None else "-" for s in SYSTEMS},
            "ratios": {f"trioworker/{p}": None for p in PEERS},
        },
    )
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    header = ["metric", "unit", *(TITLES[s] for s in SYSTEMS), *(f"tw/{TITLES[p]}" for p in PEERS), "better"]
    body = []
    for row in rows:
        cells = [row["metric"], row["unit"]]
        for system in SYSTEMS:
            value, note = row["values"][system], row["notes"][system]
            text = (
                fmt(value, row["unit"]) if row["unit"] != "x" else ("" if value is None else f"{value:.2f}")
            )
            cells.append(f"{text} ({note})" if text and note else text or note or "-")
        cells.extend(fmt_ratio(row["ratios"][f"trioworker/{p}"]) for p in PEERS)
        cells.append(row["better"] if row["unit"] != "x" else "")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    left = {0, 1, len(header) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def footnotes(data: dict[str, dict[str, Any] | None]) -> tuple[list[str], bool]:
    lines: list[str] = []
    bad = False
    for system in SYSTEMS:
        d = data[system]
        title = TITLES[system]
        if d is None:
            lines.append(f"{title}: no results file (the script did not run or crashed before writing)")
            bad = True
            continue
        head = f"{title} {d.get('version')}: status {d.get('status')}, {d.get('elapsed_seconds', 0):.0f} s"
        if d.get("quick"):
            head += ", --quick sizes"
        lines.append(head)
        for setting in d.get("settings", []):
            lines.append(f"    setting: {setting}")
        for note in d.get("notes", []):
            lines.append(f"    note: {note}")
        other = {
            phase: r["other_cpu_percent"]
            for phase, r in d.get("phases", {}).items()
            if is_number(r.get("other_cpu_percent"))
        }
        if other:
            busiest = max(other, key=lambda phase: other[phase])
            lines.append(
                f"    CPU used by other processes on the machine during its phases: "
                f"{min(other.values()):.0f}% to {other[busiest]:.0f}% ({busiest}) of {d.get('cpus')} CPUs"
            )
        for phase, result in d.get("phases", {}).items():
            if result.get("lost_note"):
                lines.append(f"    {phase}: {result['lost_note']}")
        for phase, reason in d.get("skipped", {}).items():
            lines.append(f"    skipped {phase}: {reason}")
        issues = d.get("log_issues", [])
        for issue in issues[:MAX_LOG_ISSUES]:
            lines.append(f"    log: {issue}")
        if len(issues) > MAX_LOG_ISSUES:
            lines.append(f"    log: ... {len(issues) - MAX_LOG_ISSUES} more in the JSON")
        for phase, error in d.get("errors", {}).items():
            lines.append(f"    ERROR {phase}: {error}")
            bad = True
        if d.get("status") != "done":
            bad = True
    return lines, bad


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the peers-*.json files are")
    parser.add_argument("--output", type=Path, default=RESULTS / "peers.json", help="the combined JSON")
    args, _ = parser.parse_known_args(argv)  # nox passes its posargs (--quick) along
    data = load(args.results)
    rows = build(data)
    table = render(rows)
    notes, bad = footnotes(data)
    print()
    print("trioworker vs Prefect 3 vs SAQ: the same workloads, one worker process each (issue 5)")
    print("ratio = trioworker / peer; 'better' says which way is good for that row")
    print()
    print(table)
    print()
    print("\n".join(notes))
    combined = {
        "benchmark": "peers",
        "timestamp": datetime.now(UTC).isoformat(),
        "rows": rows,
        "table": table,
        "notes": notes,
        "systems": data,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(combined, indent=2, allow_nan=True) + "\n")
    print(f"\nwritten to {args.output}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
