"""``adaptkit`` command line: thin parse -> validate -> run over the public API.

This module holds the ``main`` group (errors and signals) and adds the commands to it; each command group
lives in its own module (listed in ``adaptkit.cli``). Heavy imports (torch, transformers) happen inside the
commands, so ``adaptkit --help`` is fast. Any :class:`~adaptkit.errors.AdaptkitError` is printed as one
``error:`` line, exit status 1.
"""

from __future__ import annotations

import sys

import click

from adaptkit.cli.bench import bench
from adaptkit.cli.demo import demo
from adaptkit.cli.export import export
from adaptkit.cli.generate import generate
from adaptkit.cli.inspect_command import inspect
from adaptkit.cli.merge import extract, merge, quantize
from adaptkit.cli.serve import serve
from adaptkit.cli.train import train


class _Group(click.Group):
    """Turns adaptkit errors into one line on stderr and a non-zero exit, without a traceback."""

    def invoke(self, ctx):
        import signal
        import threading

        from adaptkit.errors import AdaptkitError

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):  # outputs in progress are removed, and the signal noted
                signal.signal(signum, _terminated)
        try:
            return super().invoke(ctx)
        except AdaptkitError as exc:
            if _signalled:  # the interrupt surfaced as another error (a write it cut short)
                _interrupted()
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            _interrupted()
        except Exception:
            if _signalled:  # raised inside a library (safetensors turns it into a ValueError): still an interrupt
                _interrupted()
            raise


_signalled: list[int] = []


def _terminated(signum, frame):
    _signalled.append(signum)
    raise KeyboardInterrupt


def _interrupted():
    click.echo("error: interrupted; outputs in progress were removed", err=True)
    sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptkit")
def main():
    """adaptkit: load, route, merge, serve and export parameter-efficient adapters."""


# The commands, added in the order they were written; ``adaptkit --help`` lists them by name.
main.add_command(merge)
main.add_command(quantize)
main.add_command(extract)
main.add_command(inspect)
main.add_command(generate)
main.add_command(demo)
main.add_command(bench)
main.add_command(serve)
main.add_command(train)
main.add_command(export)

if __name__ == "__main__":
    main()
