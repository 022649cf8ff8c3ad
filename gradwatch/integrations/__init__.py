"""Stage 7, gradwatch inside other people's training loops: ``lightning`` (the Lightning Trainer
callback) and ``hf`` (the Hugging Face Trainer callback).
Adapters use the engine's public surface only.
"""
