"""Answers from the user's documents with citations a person can check.

retrieve.py (index search → fresh passages) → prompt.py (pack under a token budget, best
passages at the edges) → the engine generates → cite.py (each [n] checked against the file as it
is now). answer.py ties the stages together for the CLI and the daemon alike; this package knows
nothing of HTTP.
"""
