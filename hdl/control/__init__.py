"""Control-plane blocks: the AXI4-Lite register map the host drives the accelerator through."""
