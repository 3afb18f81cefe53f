"""The experiment runner: registry of jobs, run planning and execution."""
