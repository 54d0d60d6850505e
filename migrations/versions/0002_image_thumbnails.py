"""Image thumbnails: a small WebP per distinct image content, for the review pages.

Revision ID: 0002_image_thumbnails
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_image_thumbnails"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "image_thumbnails",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("webp", sa.LargeBinary(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_image_thumbnails")),
    )


def downgrade() -> None:
    op.drop_table("image_thumbnails")
