"""Runnable examples built on trajops (``python -m examples.<name>``)."""
