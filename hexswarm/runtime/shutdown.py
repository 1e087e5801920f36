"""Whether this process is shutting down (a node that got SIGTERM or SIGINT): torch-free, set once.

A signal to a node's process group reaches its TP follower processes at the same moment; a stage engine
in the middle of a step then sees its follower gone.  That is the shutdown, not a failure: its thread
reports it in one line instead of a traceback.
"""

import threading

STOPPING = threading.Event()
