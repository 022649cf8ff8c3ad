"""Stage 7, gradwatch inside other people's training loops: ``lightning`` (the Trainer callback).
Adapters use the engine's public surface only.
"""
