"""served answers: what each answer of a recording `personavec serve` session was asked with

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

A recording server session is one ``generate`` run (its ``responses``); ``served_answers`` adds, per response, the
interventions the request carried (as asked, JSON), what they resolved to per layer (JSON), the vectors runs they
came from, and the request's sampling parameters. A new table keyed by the response id: DuckDB cannot ALTER a table
other tables reference by foreign key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "served_answers",
        sa.Column("response_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("interventions", sa.String(), nullable=False),
        sa.Column("applied", sa.String(), nullable=False),
        sa.Column("vector_run_ids", sa.ARRAY(sa.BigInteger()), nullable=False),
        sa.Column("params", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["response_id"], ["responses.id"], name=op.f("fk_served_answers_response_id_responses")
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_served_answers_run_id_runs")),
        sa.PrimaryKeyConstraint("response_id", name=op.f("pk_served_answers")),
    )


def downgrade() -> None:
    op.drop_table("served_answers")
