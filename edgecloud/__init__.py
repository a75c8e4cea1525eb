"""edgecloud: ten device–cloud AI research systems, runnable and measured."""

import time as _time

__version__ = "0.1.0"
PROCESS_T0 = _time.time()  # every entry point imports edgecloud first: the results layer's wall-time origin
