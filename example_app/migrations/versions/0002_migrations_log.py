"""The migrations_log table: one row per run of the upgrade (which process, when, to what head)."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "migrations_log",
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("head", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("migrations_log")
