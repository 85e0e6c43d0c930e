"""``text-generation-benchmark``: latency and throughput of a server or a shard, swept over batch shapes."""

__all__ = ["__version__"]

__version__ = "0.1.0"
