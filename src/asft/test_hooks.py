"""Test hooks: a "module:function" named in an environment variable, loaded by a stage so a test can make it hang
or die at a known point. The name comes from the job's environment, never from a config or from model text."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any


def load_hook(env_var: str) -> Callable[..., Any] | None:
    spec = os.environ.get(env_var)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
