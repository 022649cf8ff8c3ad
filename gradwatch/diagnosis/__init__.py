"""Stage 4, the diagnosis: from reports to findings. ``engine`` (:class:`Diagnosis`: the run's
memory, and the order the rules run in), the rules (``rules``: per-layer signal and norms,
``activation_rules``, ``time_rules``, ``curvature_rules``, ``divergence``, ``init_audit``),
``thresholds`` (every number a rule compares with) and ``notices`` (what the conductor says about
how it is used). A new rule goes in its own module here and is called from ``engine``.
"""

from .engine import Diagnosis, diagnose

__all__ = ["Diagnosis", "diagnose"]
