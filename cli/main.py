"""Entry point: the ``sawquant`` click group. Each subcommand lives in its own module.

Exit codes: 0 success (verify: PASS), 1 verify FAIL, 2 a usage error the user can fix (one line,
no traceback), 3 an internal error (a sawquant bug: traceback, please report), 130/143 interrupted
by Ctrl-C / SIGTERM (work in progress is cleaned up either way).
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback

import click
from rich.console import Console
from rich.markup import escape

import sawquant
from sawquant.devices import prefer_passive_waiting
from sawquant.errors import SawquantError

# Before anything imports torch (the subcommands below do): OpenMP reads it when it is loaded.
prefer_passive_waiting()

console = Console(stderr=True)

EXIT_USAGE = 2
EXIT_INTERNAL = 3


class _Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so every ``finally`` and cleanup runs."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


class SawquantGroup(click.Group):
    """User errors (SawquantError) print as one red line and exit 2; anything else is a bug."""

    def invoke(self, ctx: click.Context):
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: signals stay as they are
            previous = None
        try:
            return super().invoke(ctx)
        except SawquantError as err:
            # The message is plain text: brackets in it ("sawquant[vllm]", paths) are not markup.
            console.print(
                f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
            )
            sys.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as err:
            what = "terminated" if isinstance(err, _Terminated) else "interrupted"
            console.print(f"[bold red]{what}:[/] interrupted; nothing half-written was left")
            sys.exit(143 if isinstance(err, _Terminated) else 130)
        except Exception:  # noqa: BLE001 - the one place that turns a crash into exit 3
            console.print(traceback.format_exc(), highlight=False, markup=False)
            console.print(
                f"[bold red]internal error[/] in sawquant {sawquant.__version__}: this is a bug, "
                "please report it with the traceback above",
                highlight=False,
            )
            sys.exit(EXIT_INTERNAL)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _setup_logging() -> None:
    """Library INFO messages (the one-time demo conversion, say) go to stderr as plain lines."""
    log = logging.getLogger("sawquant")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


@click.group(cls=SawquantGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sawquant.__version__, prog_name="sawquant")
def cli() -> None:
    """Serve LLMs with a calibrated 4-bit KV cache: calibrate -> export -> verify."""
    from sawquant.devices import configure_threads

    _setup_logging()
    configure_threads()


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
