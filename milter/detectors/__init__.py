"""Detectors: one policy concern per module, each `check(message, context, rules) -> list[Finding]`.

The list of active detectors is in milter.detectors.registry (kept apart so that rules
loading can import a detector's data parser without importing every detector).
"""
