"""Memory-side blocks: the AXI4 masters and the on-chip weight buffer."""
