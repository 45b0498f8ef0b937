"""Memory management: host allocator tuning (more to come: paged block pool, pinned buffers, estimates)."""
