"""Experiments: the held-out study (`python -m controller.holdout`) and the benchmark
(`python -m controller.benchmark`, with its per-call timing and held-out request helpers). They may
import every other part of the controller; nothing imports them.
"""
