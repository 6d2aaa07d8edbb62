"""localai's terminal UI: a client of the daemon's HTTP API (it never loads a model itself)."""
