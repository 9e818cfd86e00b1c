"""Cache tiers: L1 in-process memory, L2 Redis-protocol server."""
