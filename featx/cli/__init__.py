"""The ``featx`` command: a thin shell over the library; each command calls one library function.

Exit codes: 0 success, 1 error (bad input, with a message saying how to fix it), 3 finished but with
more failed images than ``--max-failures`` allows, 130 interrupted (work done so far is kept).

The commands live by stage: :mod:`~featx.cli.extraction` (``extract``, ``join``, ``info``, ``backbones``),
:mod:`~featx.cli.classify` (``train``, ``evaluate``, ``predict``), :mod:`~featx.cli.finetuning` (``finetune``)
and :mod:`~featx.cli.jobs` (``run``, ``compare``); :mod:`~featx.cli._shared` holds their common options.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

try:
    import click

    from featx import __version__
    from featx.cli._shared import EXIT_INTERRUPTED, EXIT_TOO_MANY_FAILURES, interrupted
    from featx.cli.classify import evaluate, predict, train
    from featx.cli.extraction import backbones, extract, info, join
    from featx.cli.finetuning import finetune
    from featx.cli.jobs import compare, run
except KeyboardInterrupt:  # Ctrl-C while the command line loads: exit 130 as at any other moment, not a traceback
    sys.stderr.write("interrupted; run the same command again.\n")  # the words of _shared.interrupted()
    raise SystemExit(130) from None  # EXIT_INTERRUPTED, which may not be imported yet

__all__ = ["EXIT_INTERRUPTED", "EXIT_TOO_MANY_FAILURES", "main"]


class _Featx(click.Group):
    """The ``featx`` group: Ctrl-C at any moment exits 130 with featx's message.

    click itself turns a ``KeyboardInterrupt`` into ``Aborted!`` and exit code 1; a command's own handler
    (:func:`~featx.cli._shared.reported`) covers only its library call, not the imports before it (torch
    takes seconds), the argument parsing or the summary after it.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted()


@click.group(cls=_Featx, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """featx: frozen convnet features for transfer learning, cached with provenance.

    \b
    featx extract digits --out digits.h5     embed the built-in demo with the offline backbone
    featx info digits.h5                      show how a store was made
    featx backbones --source torchvision      list backbones
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("featx").setLevel(logging.DEBUG if verbose else logging.INFO)
    from tqdm.contrib.logging import logging_redirect_tqdm

    # While the command runs, log lines go through tqdm.write, so they never break a progress bar.
    click.get_current_context().with_resource(logging_redirect_tqdm())


# Registered in the order of the flow.
for _command in (extract, join, info, backbones, train, evaluate, predict, finetune, run, compare):
    main.add_command(_command)
del _command
