"""Choosing the package's opt-in paths by measurement, for a deployment's own call.

:func:`autotune` times a call (a captured sampler at the deployed shape) under each
option of each :class:`Choice` (by default every ``ATE_FAST_*`` path that runs on the
device: :func:`default_choices`) and returns a :class:`TuneResult`; its settings are put
in force with :func:`apply_settings` (while capturing) and saved / loaded as JSON
(:meth:`TuneResult.save`, :func:`load_settings`). ``ate-fast tune`` does the same for the
reference heads from the command line.

Names load on first use, so ``import ate_fast.tuning.cli`` (``ate-fast --help``) imports
no torch.
"""

from __future__ import annotations

from ate_fast.lazy_exports import lazy_attributes

_EXPORTS = {
    "autotune": "search",
    "median_seconds": "search",
    "Trial": "search",
    "TuneResult": "search",
    "apply_settings": "settings",
    "load_settings": "settings",
    "save_settings": "settings",
    "SWITCHES": "switches",
    "Choice": "switches",
    "Switch": "switches",
    "check_settings": "switches",
    "default_choices": "switches",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attributes(
    globals(), {name: f"ate_fast.tuning.{module}" for name, module in _EXPORTS.items()}
)
