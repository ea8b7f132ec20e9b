"""The peer benchmarks side by side: trioworker (SQLite and PostgreSQL), Prefect 3, SAQ (issues 5, 18).

Reads the results the ``run_*.py`` scripts beside this file wrote to ``benchmarks/results``:
``peers-SYSTEM.json`` for one run, ``peers-SYSTEM-k.json`` for run k of several
(``repeat.py``), where SYSTEM is ``trioworker``, ``trioworker-postgres``, ``prefect`` or
``saq``. A system without files is left out. Prints, then writes to
``benchmarks/results/peers.json`` (its shape is in README.md beside this file)::

    python benchmarks/peers/compare.py [--results DIR] [--output FILE] [--without SYSTEM[,SYSTEM]]

1. issue 18's targets: for trioworker on each store, its ratio to SAQ (or to the ideal rate,
   or its own figure) against the target, and whether it is met;
2. the absolute table: every row for every system, with trioworker/peer ratios.

With several runs of a system, each value is the median over its runs (the cell says of how
many), and a ratio is the median over k of (run k of trioworker / run k of the peer), runs
that ``repeat.py`` made one after the other; without such pairs (a peer's results from
another invocation) it is the ratio of the medians. Above 1 is better for trioworker in a
"higher is better" row (runs/s), below 1 in a "lower is better" row (ms, MB).

Standard library only (it runs with any Python 3.11+). The exit code is 1 when a run of a
system failed, was cut short, or left a phase with an error, or no system has results.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
SYSTEMS = ("trioworker", "trioworker-postgres", "prefect", "saq")
ALIASES = {"postgres": "trioworker-postgres", "pg": "trioworker-postgres"}
TITLES = {
    "trioworker": "trioworker",
    "trioworker-postgres": "trioworker (PostgreSQL)",
    "prefect": "Prefect",
    "saq": "SAQ",
}
SHORT = {"trioworker": "tw", "trioworker-postgres": "tw-PG", "prefect": "Prefect", "saq": "SAQ"}
TRIOWORKERS = ("trioworker", "trioworker-postgres")
#: (system, peer) pairs with a ratio column
RATIOS = (("trioworker", "prefect"), ("trioworker", "saq"), ("trioworker-postgres", "saq"))
MAX_LOG_ISSUES = 8
WORKLOAD_PHASES = ("drain10", "drain100", "e2e", "roundtrip", "steady", "sleep10", "sleep100")

Runs = list[tuple[int, dict[str, Any]]]  # (run number, 0 for an unnumbered file; its JSON)


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
SCALE_SMALL = "(g) drain, 1,000 queued"
SCALE_HEAD = "(g) drain first 1,000 of 100,000 queued"
SCALE_CHANGE = "(g) first 1,000: rate with 100,000 / with 1,000 queued"


@dataclass(frozen=True)
class Target:
    """One of issue 18's targets: ``measure`` of row ``metric`` ``op`` ``bound``."""

    metric: str  # a row's label
    measure: str  # "saq": trioworker / SAQ; "ideal": the value / ``ideal``; "value": the value
    op: str  # "<=" or ">="
    bound: float
    ideal: float | None = None
    unit: str = ""  # of a "value"

    def describe(self) -> str:
        if self.measure == "saq":
            return "/ SAQ"
        if self.measure == "ideal":
            return f"/ ideal {self.ideal:,.0f}/s"
        return self.unit

    def goal(self) -> str:
        if self.measure == "saq":
            return f"{self.op} {self.bound:g}x"
        if self.measure == "ideal":
            return f"{self.op} {self.bound:.0%}"
        return f"{self.op} {self.bound:g}" + (f" {self.unit}" if self.unit == "MB" else "")

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.bound if self.op == "<=" else value >= self.bound


TARGETS: tuple[Target, ...] = (
    Target("(c) round trip p50", "saq", "<=", 1.0),
    Target("(c) round trip p95", "saq", "<=", 1.0),
    Target("(c) round trip p99", "saq", "<=", 1.0),
    Target("(d) steady load p50", "saq", "<=", 1.0),
    Target("(d) steady load p95", "saq", "<=", 1.0),
    Target("(d) steady load p99", "saq", "<=", 1.0),
    Target("(a) drain, limit 10", "saq", ">=", 2.0),
    Target("(a) drain, limit 100", "saq", ">=", 2.0),
    Target("(b) submit N + await all, limit 100", "saq", ">=", 1.5),
    Target("(e) 50 ms sleeps, limit 10 (ideal 200/s)", "ideal", ">=", 0.97, ideal=200.0),
    Target("(e) 50 ms sleeps, limit 100 (ideal 2,000/s)", "ideal", ">=", 0.90, ideal=2000.0),
    Target(SCALE_CHANGE, "value", ">=", 0.8, unit="x"),
    Target("(g) server peak RSS, 100,000 queued", "value", "<=", 100.0, unit="MB"),
)


# --------------------------------------------------------------------------- loading


def load(results: Path, systems: Sequence[str] = SYSTEMS) -> dict[str, Runs]:
    """Every readable results file of each system, in run order (empty: none)."""
    out: dict[str, Runs] = {}
    for system in systems:
        pattern = re.compile(rf"peers-{re.escape(system)}(?:-(\d+))?\.json")
        runs: Runs = []
        for path in results.glob("peers-*.json"):
            match = pattern.fullmatch(path.name)
            if match is None:
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                runs.append((int(match.group(1) or 0), data))
        out[system] = sorted(runs, key=lambda run: run[0])
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


def value_of(data: dict[str, Any], row: Row) -> tuple[float | None, str]:
    """(value, note) of one run: the note says n=, or why there is no value."""
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
    """How many runs a value is of (not the lost ones: :func:`lost_of` counts those)."""
    if row.unit == "MB":
        return ""
    if row.phase == "steady":
        per_second = max(1, int(result.get("target_rate", 1)))
        return f"{per_second}/s x {int(result.get('runs', 0)) // per_second} s"
    if row.field == "head_rate":
        return f"{short(result['head_runs'])} of {short(result['queued'])}"
    if "queued" in result and result.get("queued") != result.get("runs"):
        return f"{short(result['runs'])} of {short(result['queued'])}"
    return f"n={short(result.get('runs', 0))}"


def lost_of(data: dict[str, Any], row: Row) -> int:
    if row.phase is None or row.unit == "MB":
        return 0
    lost = data.get("phases", {}).get(row.phase, {}).get("lost_runs") or 0
    return int(lost) if is_number(lost) else 0


def short(n: int) -> str:
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000:,}k"
    return f"{n:,}"


# --------------------------------------------------------------------------- the rows


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_ratio(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float | None, int]:
    """(median over the runs both have of a/b, how many pairs); with no pairs, the medians' ratio."""
    pairs = [a[k] / b[k] for k in sorted(a.keys() & b.keys()) if b[k] != 0]
    if pairs:
        return statistics.median(pairs), len(pairs)
    return ratio(median(list(a.values())), median(list(b.values()))), 0


def combine(runs: Runs, per_run: dict[int, float], first_note: str, lost: int) -> tuple[float | None, str]:
    """A system's value (median over its runs) and its note (n=, lost runs, over how many runs)."""
    parts = [first_note] if first_note else []
    if lost:
        parts.append(f"{lost} lost" + (f" in {len(runs)} runs" if len(runs) > 1 else ""))
    if len(runs) > 1 and per_run:
        of = f"{len(per_run)}" if len(per_run) == len(runs) else f"{len(per_run)} of {len(runs)} runs"
        parts.append(f"median of {of}")
    return median(list(per_run.values())), ", ".join(parts)


def build(data: Mapping[str, Runs]) -> list[dict[str, Any]]:
    """The rows of the absolute table (see README.md beside this file for their shape)."""
    systems = [s for s in SYSTEMS if data.get(s)]
    rows: list[dict[str, Any]] = []
    per_runs: dict[str, dict[str, dict[int, float]]] = {}
    for row in ROWS:
        values: dict[str, float | None] = {}
        notes: dict[str, str] = {}
        counts: dict[str, int] = {}
        per_system: dict[str, dict[int, float]] = {}
        for system in systems:
            per_run: dict[int, float] = {}
            run_notes: list[tuple[bool, str]] = []
            for index, run in data[system]:
                value, note = value_of(run, row)
                if value is not None:
                    per_run[index] = value
                run_notes.append((value is not None, note))
            # the note of the first run with a value, else why the first run has none
            first_note = next((note for valued, note in run_notes if valued), run_notes[0][1])
            lost = sum(lost_of(run, row) for _, run in data[system])
            values[system], notes[system] = combine(data[system], per_run, first_note, lost)
            counts[system] = len(per_run)
            per_system[system] = per_run
        per_runs[row.label] = per_system
        rows.append(row_dict(row.label, row.unit, row.higher_is_better, values, notes, counts, per_system))
    # (g) how the drain rate of the first 1,000 changes from 1,000 queued to 100,000, per run
    small, large = per_runs[SCALE_SMALL], per_runs[SCALE_HEAD]
    values, notes, counts, per_system = {}, {}, {}, {}
    for system in systems:
        per_run = {k: v / small[system][k] for k, v in large[system].items() if small[system].get(k)}
        values[system], notes[system] = combine(data[system], per_run, "", 0)
        notes[system] = notes[system] or ("" if per_run else "-")
        counts[system] = len(per_run)
        per_system[system] = per_run
    change = row_dict(SCALE_CHANGE, "x", True, values, notes, counts, per_system, with_ratios=False)
    index = next(i for i, r in enumerate(rows) if r["metric"] == SCALE_HEAD)
    rows.insert(index + 1, change)
    return rows


def row_dict(
    metric: str,
    unit: str,
    higher_is_better: bool,
    values: dict[str, float | None],
    notes: dict[str, str],
    counts: dict[str, int],
    per_system: dict[str, dict[int, float]],
    *,
    with_ratios: bool = True,
) -> dict[str, Any]:
    ratios: dict[str, float | None] = {}
    pairs: dict[str, int] = {}
    for system, peer in RATIOS:
        if system in values and peer in values:
            key = f"{system}/{peer}"
            if with_ratios:
                ratios[key], pairs[key] = paired_ratio(per_system[system], per_system[peer])
            else:
                ratios[key], pairs[key] = None, 0
    return {
        "metric": metric,
        "unit": unit,
        "better": "higher" if higher_is_better else "lower",
        "values": values,
        "runs": counts,
        "notes": notes,
        "ratios": ratios,
        "ratio_pairs": pairs,
    }


def evaluate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's targets for each trioworker store present (see README.md for the shape)."""
    by_metric = {row["metric"]: row for row in rows}
    stores = [s for s in TRIOWORKERS if rows and s in rows[0]["values"]]
    out: list[dict[str, Any]] = []
    for target in TARGETS:
        row = by_metric[target.metric]
        values: dict[str, float | None] = {}
        for store in stores:
            if target.measure == "saq":
                values[store] = row["ratios"].get(f"{store}/saq")
            elif target.measure == "ideal":
                values[store] = ratio(row["values"][store], target.ideal)
            else:
                values[store] = row["values"][store]
        out.append(
            {
                "metric": target.metric,
                "measure": target.describe(),
                "goal": {"op": target.op, "bound": target.bound, "text": target.goal()},
                "values": values,
                "met": {store: target.met(value) for store, value in values.items()},
            }
        )
    return out


# --------------------------------------------------------------------------- printing


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "x":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def fmt_target(target: Target, value: float | None) -> str:
    if value is None:
        return "-"
    if target.measure == "saq":
        return fmt_ratio(value)
    if target.measure == "ideal":
        return f"{value:.1%}"
    return fmt(value, target.unit)


def table(header: Sequence[str], body: Sequence[Sequence[str]], left: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def render_targets(targets: Sequence[dict[str, Any]]) -> str:
    stores = list(targets[0]["values"]) if targets else []
    header = ["target (issue 18)", "measure", "goal"]
    for store in stores:
        header += [TITLES[store], "met"]
    body = []
    for target, result in zip(TARGETS, targets, strict=True):
        cells = [target.metric, target.describe(), target.goal()]
        for store in stores:
            met = result["met"][store]
            cells += [
                fmt_target(target, result["values"][store]),
                "-" if met is None else "yes" if met else "NO",
            ]
        body.append(cells)
    return table(header, body, {0, 1, *range(4, len(header), 2)})


def targets_summary(targets: Sequence[dict[str, Any]]) -> str:
    parts = []
    for store in targets[0]["values"] if targets else []:
        met = [t["met"][store] for t in targets]
        missing = sum(1 for m in met if m is None)
        text = f"{TITLES[store]}: {sum(1 for m in met if m)} of {len(met)} targets met"
        parts.append(text + (f" ({missing} without data)" if missing else ""))
    return "; ".join(parts)


def render(rows: Sequence[dict[str, Any]]) -> str:
    systems = list(rows[0]["values"]) if rows else []
    ratio_keys = list(rows[0]["ratios"]) if rows else []
    header = [
        "metric",
        "unit",
        *(TITLES[s] for s in systems),
        *(f"{SHORT[k.split('/')[0]]}/{SHORT[k.split('/')[1]]}" for k in ratio_keys),
        "better",
    ]
    body = []
    for row in rows:
        cells = [row["metric"], row["unit"]]
        for system in systems:
            text, note = fmt(row["values"][system], row["unit"]), row["notes"][system]
            cells.append(f"{text} ({note})" if text and note else text or note or "-")
        cells.extend(fmt_ratio(row["ratios"][key]) for key in ratio_keys)
        cells.append(row["better"] if row["unit"] != "x" else "")
        body.append(cells)
    return table(header, body, {0, 1, len(header) - 1})


def percent_range(runs: Runs, field: str) -> tuple[float, float, str] | None:
    """(least, most, where the most was) of a per-phase percentage over all runs."""
    seen = [
        (float(result[field]), f"{phase}" + (f", run {index}" if len(runs) > 1 else ""))
        for index, run in runs
        for phase, result in run.get("phases", {}).items()
        if is_number(result.get(field))
    ]
    if not seen:
        return None
    most = max(seen)
    return min(value for value, _ in seen), most[0], most[1]


def footnotes(data: Mapping[str, Runs]) -> tuple[list[str], bool]:
    lines: list[str] = []
    bad = False
    quick = {bool(run.get("quick")) for runs in data.values() for _, run in runs}
    if len(quick) > 1:
        lines.append("WARNING: some runs used --quick sizes and some did not: the rows are not comparable")
    for system, runs in data.items():
        title = TITLES[system]
        if not runs:
            lines.append(f"{title}: no results (left out)")
            continue
        first = runs[0][1]
        lines.append(f"{title} {first.get('version')}: {len(runs)} run(s)")
        for index, run in runs:
            where = f"run {index}" if index else "run"
            text = (
                f"    {where}: status {run.get('status')}, {run.get('elapsed_seconds', 0):.0f} s, "
                f"started {run.get('timestamp', '?')}"
            )
            if run.get("git_commit"):
                text += f", at {str(run['git_commit'])[:12]}"
            if run.get("quick"):
                text += ", --quick sizes"
            lines.append(text)
        for setting in first.get("settings", []):
            lines.append(f"    setting: {setting}")
        for note in dict.fromkeys(note for _, run in runs for note in run.get("notes", [])):
            lines.append(f"    note: {note}")
        for field, what in (
            ("other_cpu_percent", "CPU used by other processes on the machine during its phases"),
            ("postgres_cpu_percent", "CPU used by the PostgreSQL cluster (counted in the line above too)"),
        ):
            span = percent_range(runs, field)
            if span is not None:
                lines.append(
                    f"    {what}: {span[0]:.0f}% to {span[1]:.0f}% ({span[2]}) of {first.get('cpus')} CPUs"
                )
        for index, run in runs:
            label = f"run {index}: " if len(runs) > 1 else ""
            for phase, result in run.get("phases", {}).items():
                if result.get("lost_note"):
                    lines.append(f"    {label}{phase}: {result['lost_note']}")
            for phase, reason in run.get("skipped", {}).items():
                lines.append(f"    {label}skipped {phase}: {reason}")
            issues = run.get("log_issues", [])
            for issue in issues[:MAX_LOG_ISSUES]:
                lines.append(f"    {label}log: {issue}")
            if len(issues) > MAX_LOG_ISSUES:
                lines.append(f"    {label}log: ... {len(issues) - MAX_LOG_ISSUES} more in the JSON")
            for phase, error in run.get("errors", {}).items():
                lines.append(f"    {label}ERROR {phase}: {error}")
                bad = True
            if run.get("status") != "done":
                bad = True
    return lines, bad


def system_names(values: Sequence[str]) -> set[str]:
    names = {ALIASES.get(name, name) for value in values for name in value.split(",") if name}
    unknown = sorted(names - set(SYSTEMS))
    if unknown:
        raise ValueError(f"unknown systems {unknown}: choose from {', '.join(SYSTEMS)} (postgres)")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the peers-*.json files are")
    parser.add_argument("--output", type=Path, default=RESULTS / "peers.json", help="the combined JSON")
    parser.add_argument(
        "--without", action="append", default=[], help="leave these systems out, comma-separated"
    )
    args, _ = parser.parse_known_args(argv)  # nox passes its posargs (--quick, --repeat) along
    try:
        without = system_names(args.without)
    except ValueError as exc:
        parser.error(str(exc))
    data = load(args.results, [s for s in SYSTEMS if s not in without])
    rows = build(data)
    targets = evaluate(rows)
    targets_table = render_targets(targets)
    absolute = render(rows)
    notes, bad = footnotes(data)
    present = [s for s in SYSTEMS if data.get(s)]
    runs = ", ".join(f"{TITLES[s]} {len(data[s])}" for s in present)
    title = " vs ".join(TITLES[s] for s in present) or "no results"
    print()
    print(f"{title}: the same workloads, one worker process each")
    print(f"runs: {runs or 'none'}; with several, a value is the median over a system's runs, and a ratio")
    print("the median over k of (run k / the peer's run k) (else the ratio of the medians)")
    print()
    print(targets_table)
    print()
    print(targets_summary(targets))
    print()
    print("ratio = trioworker / peer; 'better' says which way is good for that row")
    print()
    print(absolute)
    print()
    print("\n".join(notes))
    combined = {
        "benchmark": "peers",
        "timestamp": datetime.now(UTC).isoformat(),
        "runs": {system: len(data[system]) for system in data},
        "targets": targets,
        "rows": rows,
        "targets_table": targets_table,
        "table": absolute,
        "notes": notes,
        "systems": {system: [run for _, run in data[system]] for system in data},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(combined, indent=2, allow_nan=True) + "\n")
    print(f"\nwritten to {args.output}")
    return 1 if bad or not present else 0


if __name__ == "__main__":
    sys.exit(main())
