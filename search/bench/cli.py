"""`python -m search.bench [record ... | --recorded FILE ...]`: which measurement a command line asks for."""
from __future__ import annotations

import sys

from datasets.errors import run_cli


@run_cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["record"]:  # the recorded learning-curve table
        from search.bench import record
        return record.main(argv[1:])
    if any(a == "--recorded" or a.startswith("--recorded=") for a in argv):  # searches replayed on that table
        from search.bench import recorded
        return recorded.main(argv)
    from search.bench import trials  # real trials
    return trials.main(argv)
