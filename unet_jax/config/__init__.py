"""Configuration: the schema of every field, up-front validation with one-line errors, and
dotted-path overrides (sweep points, --config.* flags)."""
