"""evaluations: an ``evaluate`` run's judged figures, members and operating point

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08

New tables keyed by the run id (DuckDB cannot ALTER a table other tables reference by foreign key):
``evaluation_runs`` (the detail of an ``evaluate`` run: rubrics, coherence threshold, the operating point chosen),
``evaluation_members`` (each responses run it judged and the judge run that scored it), ``evaluation_figures``
(one row per metric x setting x persona: n, value, interval) and ``evaluation_answers`` (each sweep answer's
projection onto the steering direction, the correlation's input). The member and operating-point run ids carry no
foreign key: a generate run that ends with no answer is deleted, and its link must not stop that.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("evaluation_figures_id_seq")))
    op.create_table(
        "evaluation_runs",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("sweep_id", sa.BigInteger(), nullable=True),
        sa.Column("trait_rubric", sa.String(), nullable=True),
        sa.Column("coherence_rubric", sa.String(), nullable=False),
        sa.Column("harmful_rubric", sa.String(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("op_responses_run_id", sa.BigInteger(), nullable=True),
        sa.Column("op_coef", sa.Double(), nullable=True),
        sa.Column("op_layer", sa.Integer(), nullable=True),
        sa.Column("op_trait", sa.Double(), nullable=True),
        sa.Column("op_coherence", sa.Double(), nullable=True),
        sa.Column("report_dir", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_evaluation_runs_run_id_runs")),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["steering_sweeps.id"], name=op.f("fk_evaluation_runs_sweep_id_steering_sweeps")
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_evaluation_runs")),
    )
    op.create_table(
        "evaluation_members",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("responses_run_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("judge_run_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_evaluation_members_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "responses_run_id", name=op.f("pk_evaluation_members")),
    )
    op.create_table(
        "evaluation_figures",
        sa.Column(
            "id", sa.BigInteger(), server_default=sa.text("nextval('evaluation_figures_id_seq')"), nullable=False
        ),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("part", sa.String(), nullable=False),
        sa.Column("responses_run_id", sa.BigInteger(), nullable=True),
        sa.Column("setting", sa.String(), nullable=True),
        sa.Column("persona", sa.String(), nullable=True),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("coef", sa.Double(), nullable=True),
        sa.Column("metric", sa.String(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("lo", sa.Double(), nullable=True),
        sa.Column("hi", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_evaluation_figures_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_figures")),
    )
    op.create_table(
        "evaluation_answers",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("response_id", sa.BigInteger(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("projection", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_evaluation_answers_run_id_runs")),
        sa.ForeignKeyConstraint(
            ["response_id"], ["responses.id"], name=op.f("fk_evaluation_answers_response_id_responses")
        ),
        sa.PrimaryKeyConstraint("run_id", "response_id", name=op.f("pk_evaluation_answers")),
    )


def downgrade() -> None:
    op.drop_table("evaluation_answers")
    op.drop_table("evaluation_figures")
    op.drop_table("evaluation_members")
    op.drop_table("evaluation_runs")
    op.execute(sa.schema.DropSequence(sa.Sequence("evaluation_figures_id_seq")))
