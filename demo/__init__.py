"""The trajops demo: a small trajectory-guided character-level transformer trained on local text.

``python -m demo.train`` (or ``make demo``) trains it with and without the STP loss, plots the loss
curves and generates text through ``trajops.PagedTrajectoryKVCache``. See demo/train.py.
"""
