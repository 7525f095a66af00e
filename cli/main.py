"""Entry point: the ``sawquant`` click group. Each subcommand lives in its own module."""

from __future__ import annotations

import sys

import click
from rich.console import Console

import sawquant
from sawquant.errors import SawquantError

console = Console(stderr=True)


class SawquantGroup(click.Group):
    """Prints user errors (SawquantError) as one red line and exits 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SawquantError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=SawquantGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sawquant.__version__, prog_name="sawquant")
def cli() -> None:
    """Serve LLMs with a calibrated 4-bit KV cache: calibrate -> export -> verify."""


def _register() -> None:
    # Subcommands register themselves here; each module imports its heavy deps lazily.
    from sawquant.cli import info

    cli.add_command(info.info)
    from sawquant.cli.calibrate import calibrate as calibrate_cmd

    cli.add_command(calibrate_cmd)
    from sawquant.cli.export import export as export_cmd

    cli.add_command(export_cmd)
    from sawquant.cli.verify import verify as verify_cmd

    cli.add_command(verify_cmd)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
