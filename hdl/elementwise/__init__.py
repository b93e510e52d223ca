"""Fused fp16/fp32 element-wise units around the matmul (norms, quantizer, dequantizer, activation, residual)."""
