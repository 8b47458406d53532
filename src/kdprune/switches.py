"""The environment variables that switch kdprune's machinery, read here and nowhere else. Each has its
values, the default first. Unset or empty is the default (a shell's `VAR= dvc repro` unsets it in effect);
any other value is a ValueError naming the variable, which a stage raises before any work
(`KDPRUNE_TRACKING=false` had left tracking on, unsaid, and `KDPRUNE_FORKSERVER=` had stopped the stage where
the other two took it for the default)."""

from __future__ import annotations

import os

SWITCHES = {
    "KDPRUNE_TRACKING": ("on", "off"),  # off: no MLflow at all (kdprune.tracker.Offline)
    "KDPRUNE_SHARE": ("1", "0"),  # 0: sibling experiments share no stage (kdprune.sharing)
    # a fork server (torch, then what later stages import), one that imports torch alone, none
    "KDPRUNE_FORKSERVER": ("on", "torch", "off"),
}


def switch(name: str) -> str:
    """The value of the switch `name`, checked."""
    values = SWITCHES[name]
    found = os.environ.get(name) or values[0]
    if found not in values:
        raise ValueError(f"{name}: expected {', '.join(values[:-1])} or {values[-1]}, got {found!r}")
    return found
