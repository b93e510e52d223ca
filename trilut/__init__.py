"""trilut: FPGA accelerator generator and cycle-accurate simulator for ternary LLM inference."""

__version__ = "0.1.0"
