"""What every layer above may use and that knows nothing of models: errors, the registry decorator, the on-disk cache,
scoped patching, YAML type checks and the provenance stamped on every row."""
