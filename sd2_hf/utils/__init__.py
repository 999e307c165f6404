"""Small shared helpers (atomic writes, schema-driven CLI arguments)."""
