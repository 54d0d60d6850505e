"""Duplicate calibration: the score and model of each review decision, and the fitted
P(same | score) per model and category.

Revision ID: 0003_duplicate_calibration
Revises: 0002_image_thumbnails
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_duplicate_calibration"
down_revision: str | None = "0002_image_thumbnails"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("duplicate_decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("model_id", sa.String(length=256), nullable=True))
    op.create_table(
        "duplicate_calibrations",
        sa.Column("model_id", sa.String(length=256), nullable=False),
        sa.Column("category", sa.String(length=256), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("labels", sa.Integer(), nullable=False),
        sa.Column("positives", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("fitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "category", name=op.f("pk_duplicate_calibrations")),
    )


def downgrade() -> None:
    op.drop_table("duplicate_calibrations")
    with op.batch_alter_table("duplicate_decisions", schema=None) as batch_op:
        batch_op.drop_column("model_id")
        batch_op.drop_column("score")
