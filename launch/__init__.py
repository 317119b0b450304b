"""Slurm launching through submitit (see the Slurm issue)."""
