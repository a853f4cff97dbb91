"""What the example scripts share: learning-rate warmups whose first update learns, and
telling the user where a run's files went (and how to get the pictures when matplotlib
is missing)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from engine import nn

PLOT_HINT = 'pictures need matplotlib: pip install -e ".[plot]"'


def warmup_cosine(optimizer: nn.optim.Optimizer, warmup: int, total: int,
                  min_ratio: float = 0.0) -> nn.optim.LambdaLR:
    """Linear warmup then cosine decay, shifted one step from nn.optim.WarmupCosineLR:
    there the factor of update 0 is 0 (PyTorch's convention), so the first update would
    change nothing; here update k uses the factor of step k + 1."""
    return nn.optim.LambdaLR(optimizer, lambda s: nn.optim.warmup_cosine_factor(
        min(s + 1, total), warmup, total, min_ratio))


def linear_warmup(optimizer: nn.optim.Optimizer, warmup: int) -> nn.optim.LambdaLR:
    """lr rises linearly over `warmup` updates (the first one already at lr / warmup),
    then stays constant."""
    return nn.optim.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))


def report_files(files: dict[str, str | None]) -> None:
    """Print each file a run wrote ({what: path}); a plot that could not be drawn
    (path None) prints how to get it."""
    print("files:")
    width = max(map(len, files))
    for what, path in files.items():
        where = _short(path) if path is not None else f"not drawn ({PLOT_HINT})"
        print(f"  {what:<{width}}  {where}")


def _short(path: str) -> str:
    """The path relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None,
            run: Callable[[argparse.Namespace], Any]) -> Any:
    """Parse argv and run; a ValueError about the user's input (its message starts with
    the option at fault, "--data ...") ends the program as argparse does, with the usage
    and the message, instead of a traceback."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        if str(e).startswith("--"):
            parser.error(str(e))
        raise
