"""steering: interventions of steered/capped generate runs, their per-layer numbers, and sweeps

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

New tables keyed by run id rather than columns on ``runs``/``response_runs`` (DuckDB cannot ALTER a table other
tables reference). No foreign key to ``runs`` (as ``run_owners``): a generate run stopped by bad input before any
answer is deleted, and DuckDB's key check on delete sees rows deleted earlier in the same transaction.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("steering_sweeps_id_seq")))
    op.create_table(
        "steering_sweeps",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('steering_sweeps_id_seq')"), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("label", sa.String(), nullable=True),
        sa.Column("parameter", sa.String(), nullable=False),
        sa.Column("config", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steering_sweeps")),
    )
    op.create_table(
        "run_interventions",
        sa.Column("run_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("sweep_id", sa.BigInteger(), nullable=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("vector", sa.String(), nullable=False),
        sa.Column("vector_run_id", sa.BigInteger(), nullable=False),
        sa.Column("layers", sa.ARRAY(sa.Integer()), nullable=False),
        sa.Column("coef", sa.Double(), nullable=False),
        sa.Column("positions", sa.String(), nullable=False),
        sa.Column("normalize", sa.Boolean(), nullable=False),
        sa.Column("percentile", sa.Double(), nullable=True),
        sa.Column("reference_run_id", sa.BigInteger(), nullable=True),
        sa.Column("tau_source", sa.String(), nullable=True),
        sa.Column("spec", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["steering_sweeps.id"], name=op.f("fk_run_interventions_sweep_id_steering_sweeps")
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_interventions")),
    )
    op.create_table(
        "intervention_layers",
        sa.Column("run_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("layer", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("scale", sa.Double(), nullable=False),
        sa.Column("vector_norm", sa.Double(), nullable=False),
        sa.Column("unit_norm", sa.Double(), nullable=True),
        sa.Column("tau", sa.Double(), nullable=True),
        sa.Column("n_reference_tokens", sa.Integer(), nullable=True),
        sa.Column("vector", sa.ARRAY(sa.Float()), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "layer", name=op.f("pk_intervention_layers")),
    )


def downgrade() -> None:
    op.drop_table("intervention_layers")
    op.drop_table("run_interventions")
    op.drop_table("steering_sweeps")
    op.execute(sa.schema.DropSequence(sa.Sequence("steering_sweeps_id_seq")))
