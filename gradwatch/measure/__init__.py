"""Stage 1, what is measured: pure tensor maths (``stats``), the declared statistics
(``statistics``), the optimizer's next step (``adam``, ``updates``). Nothing here knows about
hooks, modules or steps.
"""
