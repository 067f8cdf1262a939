"""A run's stages, each streaming and resumable under the run's output: references -> sample -> score.

Each stage reads and writes artifacts under the output URI with completion markers, so it can be rerun on
its own; the driver only ever holds small per-class summaries.
"""
