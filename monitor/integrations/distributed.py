"""Kept for compatibility: the rank and unwrapping helpers live in :mod:`monitor.distributed`
(the core), which the hook imports without importing ``integrations``."""

from monitor.distributed import InactiveMonitor, rank_and_world_size, unwrap_model

__all__ = ["InactiveMonitor", "rank_and_world_size", "unwrap_model"]
