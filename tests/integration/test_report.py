"""Reports come from the ledger alone and add up to exactly the rows they cover."""

from __future__ import annotations

from sqlalchemy import func, select

from pipeline.models import LedgerEntry
from pipeline.report import ReportFilter, ledger_report, total_of
from tests.helpers import run_job

FLUX = {"model": "flux-2-dev", "prompt": "p"}  # 3 cents
SUNO = {"model": "suno-v5", "prompt": "s"}  # 5 cents


def ledger_sum(session, kind: str, job_id: int) -> int:
    return session.scalar(select(func.coalesce(func.sum(LedgerEntry.amount_cents), 0))
                          .where(LedgerEntry.kind == kind, LedgerEntry.job_id == job_id))


def test_report_totals_equal_the_ledger_rows_of_a_job_with_every_outcome(svc, fake):
    s = run_job(svc, [
        {**FLUX, "n": 2},                                               # charged
        {**SUNO, "fake": {"status": 503, "fail_first": 1, "key": "r"}},  # released, charged
        {**FLUX, "fake": {"cut": True}},                                 # unknown x4
        {**FLUX, "fake": {"status": 400}},                               # released
    ])
    with svc.sessions() as session:
        by_model = ledger_report(session, ReportFilter(job=s["id"]), by="model")
        total = total_of(by_model)
        assert total.charged_cents == ledger_sum(session, "charge", s["id"]) == 6 + 5
        assert total.unknown_cents == ledger_sum(session, "unknown", s["id"]) == 12
        assert total.released_cents == ledger_sum(session, "release", s["id"]) == 5 + 3
        assert total.calls == 1 + 2 + 4 + 1
        assert total.images == 2 + 1
        assert total.spent_cents == s["spent_cents"] == fake.stats()["billed_cents"]
        flat = ledger_report(session, ReportFilter(job=s["id"]))
        by_day = ledger_report(session, ReportFilter(job=s["id"]), by="day")
    assert [r.group for r in by_model] == ["flux-2-dev", "suno-v5"]
    assert total_of(flat).as_dict() | {"group": "x"} == total.as_dict() | {"group": "x"}
    assert total_of(by_day).spent_cents == total.spent_cents
    assert round(total.spent_cents / total.images, 4) == total.avg_cents_per_image


def test_filters_narrow_the_rows(svc, fake):
    run_job(svc, [FLUX, SUNO])
    with svc.sessions() as session:
        (only_suno,) = ledger_report(session, ReportFilter(model="suno-v5"))
        assert only_suno.charged_cents == 5
        assert ledger_report(session, ReportFilter(team="someone-else")) == []


def test_csv_export_neutralises_formulas_and_jsonl_keeps_exact_values(svc, fake):
    """Issue 16 item 17: a custom_id, revised prompt or metadata starting with =, +, -, @, a
    tab or a carriage return is a formula when the CSV is opened in a spreadsheet. In CSV
    such a cell starts with a single quote; JSONL keeps the value exact."""
    import csv
    import io
    import json

    from pipeline.export import export_rows, write_export

    starts = ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    lines = [{**FLUX, "custom_id": start, "metadata": -5 if i == 0 else {"k": start},
              "fake": {"revised_prompt": start + " again"}} for i, start in enumerate(starts)]
    lines.append({**FLUX, "custom_id": "plain", "fake": {"revised_prompt": "a fox"}})
    s = run_job(svc, lines)
    assert s["status"] == "succeeded"

    def exported(fmt: str) -> str:
        out = io.StringIO()
        with svc.sessions() as session:
            rows = export_rows(session, s["id"], svc.store.uri)
            assert write_export(rows, out, fmt) == 7
        return out.getvalue()

    rows = list(csv.DictReader(io.StringIO(exported("csv"), newline="")))
    for row, start in zip(rows, starts, strict=False):
        assert row["custom_id"] == "'" + start
        assert row["revised_prompt"] == "'" + start + " again"
    assert rows[0]["metadata"] == "'-5"
    assert rows[1]["metadata"] == json.dumps({"k": "+1"})  # starts with {: no formula
    assert (rows[6]["custom_id"], rows[6]["revised_prompt"]) == ("plain", "a fox")
    assert rows[0]["cost_cents"] == "3" and rows[0]["uri"].startswith("file://")
    records = [json.loads(line) for line in exported("jsonl").splitlines()]
    assert [r["custom_id"] for r in records] == [*starts, "plain"]
    assert [r["revised_prompt"] for r in records[:6]] == [f"{x} again" for x in starts]
    assert records[0]["metadata"] == -5
