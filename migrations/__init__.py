"""Alembic migrations of the hiedit edit log (a package so that it ships with the wheel)."""
