"""Decoder-layer blocks composed from the linear and element-wise units."""
