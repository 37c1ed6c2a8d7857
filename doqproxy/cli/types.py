"""Parameter types shared by the sub-commands."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """:class:`click.FloatRange` that also refuses ``inf`` and ``nan``.

    ``float()`` accepts both, and neither fails a range check with only a lower bound
    (``nan`` fails none at all): ``--timeout inf`` would leave a query holding its
    slot for ever. Every number option goes through here, from the command line,
    the environment or the config file alike.
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
