"""The state-changing SQL, grouped by table: each statement built once, behind a typed function.

Statements are Core, built at import: on the hot path (three transactions a render) building
and compiling one each time cost more than running it. Every function takes the caller's
connection (`db`, from `session.connection()`), so it runs in the caller's transaction, and
returns what the caller needs: a bool (did the conditional UPDATE find its row?), a count,
or a row typed by a Protocol below (a Row has these attributes; nothing is copied).
The ORM stays for admin and reporting (teams, schedules, caps, reports, exports).

Statements that must use a partial index on PostgreSQL name the status as a literal
(`models.status_is`): a generic plan of `status = $1` cannot prove the index applies.
"""

from __future__ import annotations

# --- jobs -------------------------------------------------------------------------------------

# --- job_items --------------------------------------------------------------------------------

# --- renders ----------------------------------------------------------------------------------

# --- renders: planning, pause, cancel, resume, retry (in chunks of a job) ---------------------

# --- attempts ---------------------------------------------------------------------------------

# --- ledger and the budgets' counters (jobs, team_budgets) ------------------------------------

# --- images -----------------------------------------------------------------------------------

# --- workers ----------------------------------------------------------------------------------
