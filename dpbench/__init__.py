"""dpbench: benchmark DP-SGD and the mechanisms that claim to improve it, at matched privacy."""

__version__ = "0.1.0"
