"""The command-line interface (charrnn/cli/common.py, moved here as it was)."""

from charrnn.cli.common import app, main

__all__ = ["app", "main"]
