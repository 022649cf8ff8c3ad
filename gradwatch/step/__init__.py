"""Stage 3, one logging step at the optimizer boundary: ``gather`` (the step's device numbers),
``message`` (the step as a header and tensors: combined over the ranks, copied to the host),
``distributed`` (the collectives), ``readout`` (host values -> one ``LayerStats`` per layer) and
``curvature`` (the opt-in Hessian probe).
"""
