"""run owners: which process is writing a running run

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

A separate table rather than columns on ``runs``: DuckDB cannot ALTER a table that other tables reference by foreign
key. No foreign key to ``runs`` either: DuckDB's key check on delete sees rows deleted earlier in the same
transaction, so a run and its owner row could not be removed in one unit of work.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "run_owners",
        sa.Column("run_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process_start", sa.BigInteger(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_owners")),
    )


def downgrade() -> None:
    op.drop_table("run_owners")
