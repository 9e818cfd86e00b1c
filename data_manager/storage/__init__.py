"""Storage backends: PostgreSQL/TimescaleDB and the embedded SQLite default."""
