"""Meta-World cross-embodiment benchmark: does ATE beat direct fine-tuning?

``ate-fast eval metaworld --config quick|full`` (or :func:`run_benchmark`): pre-train a
state-conditioned chunk policy on source tasks with the source robot, adapt it to hard
held-out tasks on a robot whose action space differs (:mod:`.embodiment`) with each
method in :data:`METHODS`, evaluate in Meta-World, and report success with bootstrap
confidence intervals. Needs the ``[eval]`` extra (metaworld, mujoco).

Names import on first access, so the CLI's parser stays cheap.
"""

from __future__ import annotations

from ate_fast.lazy_exports import lazy_attributes

_LAZY = {
    "CONFIGS": "ate_fast.eval.metaworld.config",
    "METHODS": "ate_fast.eval.metaworld.config",
    "EvalConfig": "ate_fast.eval.metaworld.config",
    "Method": "ate_fast.eval.metaworld.config",
    "SHIFTS": "ate_fast.eval.metaworld.embodiment",
    "Shift": "ate_fast.eval.metaworld.embodiment",
    "plan": "ate_fast.eval.metaworld.runner",
    "run_benchmark": "ate_fast.eval.metaworld.runner",
}
__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
