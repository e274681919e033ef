"""Command-line interface: flags -> config -> one library call -> output.

stdout carries data only (generated text, eval results, --json); progress, samples
during training, warnings and the resolved setup go to stderr. Exit codes: 0 ok,
1 a domain error, 2 a usage error, 130 interrupted (Ctrl-C). The only package that
prints or exits.

One module a group of commands: common (the app, errors to exit codes, main), train
(train, prepare), infer (sample, eval), tools (gradients, viz, serve, export). Importing
this package registers every command, in the order `charrnn --help` lists them.

May import: every room (it is the door); nothing imports it.
"""

from charrnn.cli import train, infer, tools  # noqa: F401, I001  (registers the commands: --help lists them in this order)
from charrnn.cli.common import app, main

__all__ = ["app", "main"]
