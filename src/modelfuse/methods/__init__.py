"""Merge methods: pure tensor functions, each registered once in its own module.

Importing this package imports every public module in it, which registers its methods.
"""

import importlib
import pkgutil

from modelfuse.methods._registry import (
    MethodSpec,
    Param,
    ParamSpec,
    all_methods,
    get_method,
    get_post_step,
    register,
    register_post_step,
)
from modelfuse.methods._steps import l1_scale

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MethodSpec", "Param", "ParamSpec", "all_methods", "get_method", "get_post_step", "l1_scale", "register",
           "register_post_step"]
