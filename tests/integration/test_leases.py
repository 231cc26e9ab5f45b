"""Lease renewal: a live worker keeps every render it holds, and never waits on another
transaction's row locks to do it (PostgreSQL)."""

from __future__ import annotations

import sqlalchemy as sa

from pipeline.dispatch import dispatch_pending
from pipeline.leases import LeaseKeeper
from tests.helpers import submit


def _leases(svc) -> dict[int, object]:
    with svc.engine.connect() as connection:
        return dict(connection.execute(sa.text("SELECT id, lease_until FROM renders")).all())


def test_renewal_skips_a_render_another_transaction_locks_and_renews_it_next_beat(svc):
    submit(svc, [{"model": "flux-2-dev", "prompt": f"p {i}"} for i in range(2)],
           budget_cents=100)
    first, second = dispatch_pending(svc)
    with svc.engine.begin() as connection:
        connection.execute(sa.text("UPDATE renders SET status = 'running'"))
    keeper = LeaseKeeper(svc.sessions, lease_seconds=3_600)
    try:
        with keeper.keep(first), keeper.keep(second):
            postgresql = svc.engine.dialect.name == "postgresql"
            if postgresql:  # a settlement in progress holds the first render's row
                locker = svc.engine.connect()
                locker.begin()
                locker.execute(sa.text("SELECT id FROM renders WHERE id = :id FOR UPDATE"),
                               {"id": first})
                assert keeper.renew() == 1  # at once: skipped, not waited for
                leases = _leases(svc)
                assert leases[first] is None and leases[second] is not None
                locker.rollback()
                locker.close()
            assert keeper.renew() == 2
            assert all(lease is not None for lease in _leases(svc).values())
    finally:
        keeper.stop()
