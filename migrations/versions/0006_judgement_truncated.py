"""judgements.truncated: a judge answer cut to the stored size bound is marked

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

What is stored of an endpoint's answer is bounded by what was asked (``max_tokens`` x 64 bytes, never over 1 MiB);
a generated answer cut there is stored with ``finish_reason`` "truncated", but a judgement has no finish reason.
``truncated`` says its ``raw_output`` is a cut (its score, if any, is read from what was kept: the first token's
logprobs, or the text's start). Existing judgements are not cut: false.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("judgements", sa.Column("truncated", sa.Boolean(), server_default=sa.false(), nullable=True))


def downgrade() -> None:
    op.drop_column("judgements", "truncated")
