"""course_lib — the reference implementations the Neurons to LLMs chapters import.

Small modules by topic:

- :mod:`course_lib.device`   — pick CUDA/CPU (MPS on request), seeding, autocast dtype
- :mod:`course_lib.quick`    — the quick-mode switch (``COURSE_QUICK=1``) that shrinks training for CI
- :mod:`course_lib.data`     — sklearn digits, 2-D toy sets, the Shakespeare corpus
- :mod:`course_lib.training` — a small training loop with a ``tqdm.auto`` progress bar and a history
- :mod:`course_lib.plotting` — loss curves, decision boundaries, image grids
- :mod:`course_lib.checks`   — student-facing checks for visible tests, and ``forbidden`` for hidden ones
- :mod:`course_lib.sizing`   — parameter, memory and compute arithmetic for models (chapter 0)
- :mod:`course_lib.mlp`      — a two-layer MLP with hand-written backprop (chapter 1)
"""

from course_lib.device import autocast_dtype, describe_device, get_device, seed_everything
from course_lib.quick import QUICK_ENV, is_quick, pick

__all__ = [
    "QUICK_ENV",
    "autocast_dtype",
    "describe_device",
    "get_device",
    "is_quick",
    "pick",
    "seed_everything",
]
__version__ = "0.1.0"
