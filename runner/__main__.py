"""`python -m runner ...` is an alias of `python runner/main.py ...` and of the `twohop` command."""
from runner.main import cli

cli()
