"""Triton kernels for the memory-bound tails of a TEMPO step, installed as ``tempo_mega.kernels``.

Each kernel sits beside a plain torch reference. This folder must never be importable as a
top-level ``kernels`` module (transformers probes for a hub package of that name).
"""
