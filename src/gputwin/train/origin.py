"""How this trainer process began: as a fresh Python, or forked by the warm-start server (train/warm.py).

Its own module so that the loop can read it without importing the server (which imports the loop)."""

FORKED = False  # set by warm.fork_trainer in the forked trainer; its `started` event says "warm fork"
