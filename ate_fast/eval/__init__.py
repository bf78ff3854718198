"""Evaluation of adapted policies on simulators."""
