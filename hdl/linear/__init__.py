"""The ternary linear path: the TLMM engine, its DDR-fed form and BitLinear."""
