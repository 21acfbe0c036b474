"""Progress bars on a terminal only. Redirected to a file, tqdm writes every refresh of a bar into one line
(carriage returns, no newline): a refit log had lines thousands of characters long. Off a terminal the commands
print a plain line per step instead (an epoch, a phase), and the bars are off."""
from __future__ import annotations

import sys


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where the bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def bar(iterable=None, *, enabled: bool = True, file=None, **kwargs):
    """A tqdm bar when ``enabled`` and ``file`` (default stderr) is a terminal; else a silent pass-through."""
    from tqdm.auto import tqdm

    file = sys.stderr if file is None else file
    return tqdm(iterable, disable=not (enabled and on_terminal(file)), file=file, **kwargs)
