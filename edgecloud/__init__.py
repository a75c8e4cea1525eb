"""edgecloud: ten device–cloud AI research systems, runnable and measured."""

__version__ = "0.1.0"
