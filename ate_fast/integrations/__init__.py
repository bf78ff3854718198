"""Integrations with the training and inference stacks users run (``lerobot``).

Each integration imports its package only when used: ``import ate_fast.integrations``
needs nothing beyond ate_fast's own dependencies.
"""
