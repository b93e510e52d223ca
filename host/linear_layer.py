"""Run one of a model's ternary linear layers through the TLMM engine and compare.

The three numerics levels of DESIGN.md section 3 meet here for one layer:

1. float reference: the golden model's own linear output for the prompt;
2. hardware numerics: int8 per-token activations x ternary weights, exact integer sums,
   dequantized by ``weight scale / activation scale``;
3. RTL: the TLMM engine, run by whatever ``Transport`` the caller hands in (cycle-accurate
   Verilator simulation from the CLI), whose integer sums must equal level 2 bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trilut.config import EngineConfig
from trilut.host.layer_runs import TlmmCase, run_job, tlmm_job
from trilut.models import numerics as nm
from trilut.models.bitnet import BitNetModel
from trilut.transport import PhaseResult, Transport

__all__ = ["LinearComparison", "run_linear_layer"]


@dataclass(frozen=True)
class LinearComparison:
    layer: str
    shape: tuple[int, int, int]          # M (tokens) x K x N
    run: PhaseResult                     # what the transport measured (cycles, beats)
    ideal_cycles: int                    # one weight beat per cycle
    rtl_vs_numerics_max_abs: int         # integer sums: must be 0
    float_max_abs_error: float           # dequantized RTL output vs the golden model's float
    float_cosine: float
    float_reference_max_abs: float

    @property
    def bit_exact(self) -> bool:
        return self.rtl_vs_numerics_max_abs == 0


def run_linear_layer(model: BitNetModel, layer: str, input_ids, engine: EngineConfig,
                     transport: Transport, *, stall: float = 0.0) -> LinearComparison:
    """Feed the prompt through the golden model, capture what ``layer`` receives, and run
    that linear on the engine through ``transport``."""
    linears = model.linear_weights()
    if layer not in linears:
        raise ValueError(f"model has no ternary linear {layer!r}; it has: "
                         f"{', '.join(list(linears)[:8])}, ...")
    values, scale = linears[layer]
    x = model.capture_linear_inputs(input_ids, [layer])[layer]
    x = x.reshape(-1, x.shape[-1]).float()
    acts, act_scale = nm.int8_quantize(x)
    n, k = values.shape
    engine.check_shape(k, n)

    case = TlmmCase(layer, acts.numpy().astype(np.int64), values.numpy().astype(np.int64),
                    stall=stall, seed=1)
    (results,), (run,) = run_job(transport, tlmm_job(engine, [case]))

    exact = nm.ternary_matmul(case.acts, case.weights)
    rtl_error = int(np.abs(results - exact).max())
    # Level 2's dequantization: integer sum x weight scale / activation scale.
    dequant = torch.from_numpy(results).double() * scale / act_scale.double()
    with torch.no_grad():
        reference = model.linear(layer)(x).double()
    diff = (dequant - reference).abs()
    cosine = torch.nn.functional.cosine_similarity(dequant.flatten(), reference.flatten(), dim=0)
    return LinearComparison(
        layer=layer, shape=(acts.shape[0], k, n), run=run,
        ideal_cycles=engine.ideal_cycles(acts.shape[0], k, n),
        rtl_vs_numerics_max_abs=rtl_error, float_max_abs_error=float(diff.max()),
        float_cosine=float(cosine), float_reference_max_abs=float(reference.abs().max()))
