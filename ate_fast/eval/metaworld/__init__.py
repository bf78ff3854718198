"""Meta-World cross-embodiment benchmark: does ATE beat direct fine-tuning?

``ate-fast eval metaworld --config quick|full`` (or :func:`run_benchmark`): pre-train a
state-conditioned chunk policy on source tasks with the source robot, adapt it to hard
held-out tasks on a robot whose action space differs (:mod:`.embodiment`) with each
method in :data:`METHODS`, evaluate in Meta-World, and report success with bootstrap
confidence intervals. Needs the ``[eval]`` extra (metaworld, mujoco).
"""

from ate_fast.eval.metaworld.config import CONFIGS, METHODS, EvalConfig, Method
from ate_fast.eval.metaworld.embodiment import SHIFTS, Shift
from ate_fast.eval.metaworld.runner import plan, run_benchmark

__all__ = ["CONFIGS", "METHODS", "SHIFTS", "EvalConfig", "Method", "Shift", "plan", "run_benchmark"]
