"""One sub-package per job; each exposes `JOB` (see runner.registry)."""
