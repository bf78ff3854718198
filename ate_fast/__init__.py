"""ate_fast: Align-Then-stEer for diffusion and flow VLA policies, fast.

Importing this package is cheap and never touches a native module: the C++/CUDA
modules and Triton load on first use (see :mod:`ate_fast.native`).
"""

from ate_fast._version import __version__
from ate_fast.info import info
from ate_fast.ops import guided_step

__all__ = ["__version__", "guided_step", "info"]
