"""Stage 7, the ``gradwatch`` command (``command``) and the demo it runs (``demo``): programs that
use the engine, above it."""

from .command import main

__all__ = ["main"]
