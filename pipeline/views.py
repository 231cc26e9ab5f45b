"""What the commands show, as text: pure functions of the rows and summaries they read (no
I/O, no click), so `cli.py` only parses, calls and prints, and each view is one function."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.caps import Caps
from pipeline.export import neutralised
from pipeline.report import ReportRow
from pipeline.submission import Submission


@dataclass
class TableView:
    """A table as the terminal shows it: the last row in bold when `total`."""

    title: str
    columns: tuple[str, ...]
    rows: list[list[str]] = field(default_factory=list)
    right: tuple[str, ...] = ()  # the columns aligned right (numbers)
    total: bool = False


def money(cents: int | None) -> str:
    return "-" if cents is None else f"${cents / 100:,.2f}"


def cap_notes(planned: Submission, cap: int) -> list[str]:
    """What a user should know of a job whose plan costs more than its cap."""
    if planned.max_cost_cents <= cap:
        return []
    return [f"note: the plan costs up to {money(planned.max_cost_cents)} but the cap is "
            f"{money(cap)}: renders that do not fit will fail with reason 'budget'"]


def items_done(s: Mapping[str, Any]) -> int:
    return s["items_succeeded"] + s["items_failed"] + s["items_cancelled"]


def spent_of_cap(s: Mapping[str, Any], *, unknown: bool = True) -> str:
    """`N/M items, F files, spent $X of $Y` (and, `unknown`, what of it is unknown)."""
    extra = f" ({money(s['unknown_cents'])} unknown)" if unknown and s["unknown_cents"] else ""
    return (f"{s['items_succeeded']}/{s['items_total']} items, {s['images']} files, spent "
            f"{money(s['spent_cents'])} of {money(s['budget_cents'])}{extra}")


def progress_line(s: Mapping[str, Any]) -> str:
    """A plain progress line of a job rendering here (no terminal for a bar)."""
    return (f"job {s['id']}: {items_done(s)}/{s['items_total']} items, {s['images']} files, "
            f"spent {money(s['spent_cents'])} / {money(s['budget_cents'])}, {s['status']}")


def job_lines(s: Mapping[str, Any]) -> list[str]:
    """`status JOB`: the job, its items, files and money, then its failed lines."""
    return [
        f"job {s['id']} ({s['name'] or 'unnamed'}, team {s['team']}): {s['status']}",
        f"  items: {s['items_succeeded']} succeeded, {s['items_failed']} failed, "
        f"{s['items_cancelled']} cancelled, {s['items_total']} in all",
        f"  files: {s['images']}",
        f"  money: spent {money(s['spent_cents'])} (unknown {money(s['unknown_cents'])}), "
        f"reserved {money(s['reserved_cents'])}, cap {money(s['budget_cents'])}",
        *(f"  line {e['line']}: {e['error']}" for e in s["errors"]),
    ]


def item_error_lines(errors: Iterable[Mapping[str, Any]]) -> list[str]:
    return [f"  line {e['line']}{f' ({cid})' if (cid := e['custom_id']) else ''}: {e['error']}"
            for e in errors]


def jobs_table(jobs: Iterable[Mapping[str, Any]]) -> TableView:
    return TableView("jobs", ("id", "name", "team", "status", "items", "files", "spent", "cap"),
                     [[str(s["id"]), s["name"] or "", s["team"], s["status"],
                       f"{s['items_succeeded']}/{s['items_total']}", str(s["images"]),
                       money(s["spent_cents"]), money(s["budget_cents"])] for s in jobs])


def price_shown(caps: Caps) -> str:
    if caps.refused is not None:
        return "refused"
    return "no price" if caps.price_per_image_cents is None else f"{caps.price_per_image_cents}¢"


def models_table(title: str, caps: Iterable[Caps]) -> TableView:
    return TableView(title, ("model", "modalities", "max_n", "aspect ratios / sizes",
                             "qualities", "max input images", "price / image"),
                     [[c.model, ", ".join(c.modalities), str(c.max_n or "any"),
                       ", ".join((c.aspect_ratios or ()) + (c.sizes or ())) or "any",
                       ", ".join(c.qualities or ()) or "any",
                       "any" if c.max_input_images is None else str(c.max_input_images),
                       price_shown(c)] for c in caps])


def plan_table(title: str, plan: Submission) -> TableView:
    rows = [[m.model, str(m.items), str(m.images), str(m.calls), money(m.max_cost_cents)]
            for m in plan.by_model.values()]
    rows.append(["total", str(plan.items), str(plan.images), str(plan.calls),
                 money(plan.max_cost_cents)])
    return TableView(title, ("model", "items", "images", "calls", "max cost"), rows,
                     right=("items", "images", "calls", "max cost"), total=True)


def plan_dict(plan: Submission) -> dict[str, Any]:
    return {
        "items": plan.items,
        "images": plan.images,
        "calls": plan.calls,
        "max_cost_cents": plan.max_cost_cents,
        "by_model": [m.__dict__ for m in plan.by_model.values()],
        "errors": [{"line": e.line, "custom_id": e.custom_id, "reason": e.reason}
                   for e in plan.errors],
        "error_count": plan.error_count,
    }


def teams_table(states: Iterable[Any]) -> TableView:
    return TableView("teams", ("team", "period", "limit", "spent", "unknown", "reserved",
                               "left"),
                     [[s.team, s.period, money(s.limit_cents), money(s.spent_cents),
                       money(s.unknown_cents), money(s.reserved_cents), money(s.left_cents)]
                      for s in states])


def team_lines(state: Any) -> list[str]:
    d = state.as_dict()
    return [f"team {state.team} ({state.period}): limit {money(state.limit_cents)}, "
            f"spent {money(state.spent_cents)} (unknown {money(state.unknown_cents)}), "
            f"reserved {money(state.reserved_cents)}, left {money(state.left_cents)}",
            f"period: {d['period_start'] or 'all time'} to {d['period_end'] or 'forever'}"]


def report_table(by: str | None, rows: list[ReportRow]) -> TableView:
    """The ledger's rows, their total last."""
    numbers = ("calls", "images", "charged", "unknown", "released", "per image", "reused",
               "saved")
    return TableView("costs from the ledger", (by or "", *numbers),
                     [[row.group, str(row.calls), str(row.images), money(row.charged_cents),
                       money(row.unknown_cents), money(row.released_cents),
                       "-" if row.avg_cents_per_image is None
                       else f"{row.avg_cents_per_image:.2f}¢", str(row.reused_images),
                       money(row.saved_cents)] for row in rows],
                     right=numbers, total=True)


def schedules_table(views: Iterable[Any]) -> TableView:
    return TableView("schedules", ("name", "cron", "zone", "team", "cap", "next (UTC)",
                                   "last job", "status"),
                     [[v.name, v.cron, v.timezone, v.team, money(v.budget_cents),
                       f"{v.next_firing:%Y-%m-%d %H:%M}", str(v.last_job_id or "-"),
                       v.last_job_status or "-"] for v in views])


def write_csv(rows: list[dict[str, Any]], out: IO[str]) -> None:
    """Rows of one shape as CSV, as `export` writes it: CRLF (RFC 4180), and user strings
    (team and model names) never read as formulas."""
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({k: neutralised(v) for k, v in row.items()} for row in rows)
