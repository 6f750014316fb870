"""Launchers: render and submit cluster jobs (``tempo-mega launch slurm ...``). Standard library only."""
