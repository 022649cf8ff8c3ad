"""Stage 5, where reports go: ``sinks`` (TensorBoard, warnings, loggers), ``tags`` (the scalar
names), ``dashboard`` (TensorBoard's custom-scalar layout), ``heatmaps`` and ``figures`` (images),
``logreader`` (event files read back). A new sink goes here.
"""
