"""How node processes (and their engine processes) format log lines; torch-free, so that a node
without a model starts without importing torch (it took most of a membership-only node's start)."""

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"
