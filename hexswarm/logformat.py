"""How node processes (and their engine processes) format log lines; torch-free, so that a node
without a model starts without importing torch (it took most of a membership-only node's start)."""

import logging
import os
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


_LIBP2P_SET = False


def quiet_libp2p(debug: bool = False, *, once: bool = False) -> None:
    """py-libp2p's own logs off (it logs normal stream ends as warnings and a peer's "protocol not supported"
    as a many-line error, which drown ours, and a client command reports the failure itself in one line);
    `debug`: all of it at debug.  HEXSWARM_LIBP2P_DEBUG=libp2p.relay,...: those loggers only, at debug (all of
    them at debug slow a node down several times over).  `once`: leave a setting made before alone (a client
    host inside a node keeps the node's)."""
    global _LIBP2P_SET
    if once and _LIBP2P_SET:
        return
    _LIBP2P_SET = True
    import libp2p  # noqa: F401  (its import resets the libp2p logger: configure after it)

    logger = logging.getLogger("libp2p")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.DEBUG if debug else logging.CRITICAL)
    for name in filter(None, os.environ.get("HEXSWARM_LIBP2P_DEBUG", "").split(",")):
        logging.getLogger(name).setLevel(logging.DEBUG)
