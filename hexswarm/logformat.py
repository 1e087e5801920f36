"""How node processes (and their engine processes) format log lines; torch-free, so that a node
without a model starts without importing torch (it took most of a membership-only node's start)."""

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"


def log_to_stderr(level: int | str) -> None:
    """A serving process's logging: LOG_FORMAT lines on stderr.  The format names no source file, thread
    or process, so records skip finding them (the logging cookbook's advice): the caller's frame walk
    alone was 7% of a CPU node's event loop under 32 streams (docs/BENCHMARKS.md, run 20)."""
    logging._srcfile = None  # no findCaller: %(filename)s, %(lineno)d and %(funcName)s are not in the format
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT, stream=sys.stderr, force=True)
