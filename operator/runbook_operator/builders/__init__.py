"""Pure functions: models -> child manifests (plain dicts) and schedules. No I/O."""
