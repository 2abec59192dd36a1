"""The job queue and runner for [events] commands (master side only)."""
