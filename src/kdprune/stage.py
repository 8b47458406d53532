"""What every stage script shares: its command line, its error handling, the params it logs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from kdprune.errors import CheckpointError, DataError, ParamsError, TrackingError
from kdprune.params import Params, flatten

EXPECTED = (ParamsError, CheckpointError, DataError, TrackingError)


def parser(doc: str, *paths: str) -> argparse.ArgumentParser:
    """--params plus one required --<path> option per input or output the stage touches."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file")
    for name in paths:
        ap.add_argument(f"--{name.replace('_', '-')}", type=Path, required=True, dest=name)
    return ap


def guard(main: Callable[[], Any]) -> None:
    """Run a stage: expected failures print one line per problem and exit 2; Ctrl-C/SIGTERM exit 130."""
    try:
        main()
    except EXPECTED as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        raise SystemExit(130) from None


def section(p: Params, *names: str) -> dict[str, Any]:
    """The flattened params a stage reads: section names ('teacher') or single keys ('seed')."""
    flat = flatten(p)
    return {k: v for k, v in flat.items() if any(k == n or k.startswith(n + ".") for n in names)}
