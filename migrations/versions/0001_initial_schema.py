"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQUENCES = (
    "runs_id_seq",
    "persona_sets_id_seq",
    "personas_id_seq",
    "question_sets_id_seq",
    "questions_id_seq",
    "responses_id_seq",
    "activations_id_seq",
    "vectors_id_seq",
)


def upgrade() -> None:
    for name in SEQUENCES:
        op.execute(sa.schema.CreateSequence(sa.Sequence(name)))
    op.create_table(
        "runs",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('runs_id_seq')"), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("wall_s", sa.Double(), nullable=True),
        sa.Column("package_version", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=True),
        sa.Column("config", sa.String(), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_table(
        "extraction_runs",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("source_run_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_revision", sa.String(), nullable=True),
        sa.Column("architecture", sa.String(), nullable=True),
        sa.Column("n_model_layers", sa.Integer(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("layers", sa.ARRAY(sa.Integer()), nullable=False),
        sa.Column("dtype", sa.String(), nullable=False),
        sa.Column("span_rule", sa.String(), nullable=False),
        sa.Column("prompt_format", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("zarr_group", sa.String(), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.BigInteger(), nullable=True),
        sa.Column("tok_s", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_extraction_runs_run_id_runs")),
        sa.ForeignKeyConstraint(["source_run_id"], ["runs.id"], name=op.f("fk_extraction_runs_source_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_extraction_runs")),
    )
    op.create_table(
        "persona_sets",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('persona_sets_id_seq')"), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_persona_sets_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_persona_sets")),
        sa.UniqueConstraint("name", name=op.f("uq_persona_sets_name")),
    )
    op.create_table(
        "question_sets",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('question_sets_id_seq')"), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_question_sets_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_question_sets")),
        sa.UniqueConstraint("name", name=op.f("uq_question_sets_name")),
    )
    op.create_table(
        "vector_runs",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("extraction_run_id", sa.BigInteger(), nullable=False),
        sa.Column("group_by", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["extraction_run_id"], ["runs.id"], name=op.f("fk_vector_runs_extraction_run_id_runs")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_vector_runs_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_vector_runs")),
    )
    op.create_table(
        "vectors",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('vectors_id_seq')"), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("group_key", sa.String(), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("norm", sa.Double(), nullable=False),
        sa.Column("vector", sa.ARRAY(sa.Float()), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_vectors_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vectors")),
        sa.UniqueConstraint("run_id", "layer", "group_key", name=op.f("uq_vectors_run_id_layer_group_key")),
    )
    op.create_table(
        "personas",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('personas_id_seq')"), nullable=False),
        sa.Column("persona_set_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("system_prompt", sa.String(), nullable=False),
        sa.Column("groups", sa.ARRAY(sa.String()), nullable=False),
        sa.ForeignKeyConstraint(
            ["persona_set_id"], ["persona_sets.id"], name=op.f("fk_personas_persona_set_id_persona_sets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_personas")),
        sa.UniqueConstraint("persona_set_id", "name", name=op.f("uq_personas_persona_set_id_name")),
    )
    op.create_table(
        "questions",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('questions_id_seq')"), nullable=False),
        sa.Column("question_set_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["question_set_id"], ["question_sets.id"], name=op.f("fk_questions_question_set_id_question_sets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_questions")),
        sa.UniqueConstraint("question_set_id", "position", name=op.f("uq_questions_question_set_id_position")),
        sa.UniqueConstraint("question_set_id", "text", name=op.f("uq_questions_question_set_id_text")),
    )
    op.create_table(
        "response_runs",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("persona_set_id", sa.BigInteger(), nullable=False),
        sa.Column("question_set_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("source", sa.String(), nullable=True),
        sa.Column("source_sha256", sa.String(), nullable=True),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("temperature", sa.Double(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=True),
        sa.Column("top_p", sa.Double(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["persona_set_id"], ["persona_sets.id"], name=op.f("fk_response_runs_persona_set_id_persona_sets")
        ),
        sa.ForeignKeyConstraint(
            ["question_set_id"],
            ["question_sets.id"],
            name=op.f("fk_response_runs_question_set_id_question_sets"),
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_response_runs_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_response_runs")),
    )
    op.create_table(
        "responses",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('responses_id_seq')"), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("persona_id", sa.BigInteger(), nullable=False),
        sa.Column("question_id", sa.BigInteger(), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("text", sa.String(), nullable=True),
        sa.Column("finish_reason", sa.String(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_s", sa.Double(), nullable=True),
        sa.Column("model_reported", sa.String(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["persona_id"], ["personas.id"], name=op.f("fk_responses_persona_id_personas")),
        sa.ForeignKeyConstraint(["question_id"], ["questions.id"], name=op.f("fk_responses_question_id_questions")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_responses_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_responses")),
        sa.UniqueConstraint(
            "run_id",
            "persona_id",
            "question_id",
            "sample_index",
            name=op.f("uq_responses_run_id_persona_id_question_id_sample_index"),
        ),
    )
    op.create_table(
        "activations",
        sa.Column("id", sa.BigInteger(), server_default=sa.text("nextval('activations_id_seq')"), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("response_id", sa.BigInteger(), nullable=False),
        sa.Column("row", sa.Integer(), nullable=False),
        sa.Column("span_start", sa.Integer(), nullable=False),
        sa.Column("span_end", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("n_response_tokens", sa.Integer(), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["response_id"], ["responses.id"], name=op.f("fk_activations_response_id_responses")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_activations_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_activations")),
        sa.UniqueConstraint("run_id", "response_id", name=op.f("uq_activations_run_id_response_id")),
        sa.UniqueConstraint("run_id", "row", name=op.f("uq_activations_run_id_row")),
    )


def downgrade() -> None:
    op.drop_table("activations")
    op.drop_table("responses")
    op.drop_table("response_runs")
    op.drop_table("questions")
    op.drop_table("personas")
    op.drop_table("vectors")
    op.drop_table("vector_runs")
    op.drop_table("question_sets")
    op.drop_table("persona_sets")
    op.drop_table("extraction_runs")
    op.drop_table("runs")
    for name in SEQUENCES:
        op.execute(sa.schema.DropSequence(sa.Sequence(name)))
