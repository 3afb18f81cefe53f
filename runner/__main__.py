"""`python -m runner ...` is an alias of `python runner/main.py ...`."""
import sys

from runner.main import main

sys.exit(main())
