"""Hydra configuration groups, installed as ``tempo_mega.configs``."""
