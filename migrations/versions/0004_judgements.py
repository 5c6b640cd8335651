"""judgements: judge runs and one score (or error) per response and rubric

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-02

New tables keyed by run id, no new columns on existing ones: DuckDB cannot ALTER a table other tables reference by
foreign key. ``judge_runs`` is the detail row of a ``judge`` run (which responses run it judged, with which model);
``judgements`` holds one row per (run, response, rubric): a score, or an error with the judge's raw output kept.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("judgements_id_seq")))
    op.create_table(
        "judge_runs",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("responses_run_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("rubrics", sa.ARRAY(sa.String()), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_judge_runs_run_id_runs")),
        sa.ForeignKeyConstraint(["responses_run_id"], ["runs.id"], name=op.f("fk_judge_runs_responses_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_judge_runs")),
    )
    op.create_table(
        "judgements",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('judgements_id_seq')"), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("response_id", sa.BigInteger(), nullable=False),
        sa.Column("rubric", sa.String(), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("method", sa.String(), nullable=True),
        sa.Column("numeric_mass", sa.Double(), nullable=True),
        sa.Column("raw_output", sa.String(), nullable=True),
        sa.Column("top_logprobs", sa.String(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("latency_s", sa.Double(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("model_reported", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_judgements_run_id_runs")),
        sa.ForeignKeyConstraint(["response_id"], ["responses.id"], name=op.f("fk_judgements_response_id_responses")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judgements")),
        sa.UniqueConstraint("run_id", "response_id", "rubric", name=op.f("uq_judgements_run_id_response_id_rubric")),
    )


def downgrade() -> None:
    op.drop_table("judgements")
    op.drop_table("judge_runs")
    op.execute(sa.schema.DropSequence(sa.Sequence("judgements_id_seq")))
