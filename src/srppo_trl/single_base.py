"""Stable import path of single-base mode (`build_single_base`, `is_single_base`, ...).

The code lives in `srppo_trl.models.single_base`; this module re-exports its `__all__`.
"""

from .models.single_base import *  # noqa: F403
from .models.single_base import __all__  # noqa: F401
