"""How far the element-wise numerics (``models/fp16.py``) are from the float reference.

``error_report`` runs the FFN block of every layer of a model two ways on the same residual
stream, captured from a float forward pass:

* reference (numerics level 1): the golden model's float32 modules,
  ``h + down(sub_norm(relu2(gate(norm(h))) * up(norm(h))))``;
* hardware (level 2): ``norm -> quantize -> exact ternary matmul -> dequantize -> relu2 x up
  -> sub-norm -> quantize -> down -> dequantize -> residual add``, every element-wise step
  in the format under test (fp16 is the design's; bf16, e8m10 and fp32 are measured for
  the argument in docs/elementwise.md).

Each op is also measured alone: its float32 reference is applied to the hardware op's own
inputs, so the per-op numbers do not include upstream error. ``format_report`` renders the
result as the markdown tables of docs/elementwise.md; ``python -m
trilut.models.fp16_error`` prints them for the tiny checkpoint.

Metrics, over all elements of all layers: ``max_abs = max |y - ref|``; ``max_rel = max |y -
ref| / |ref|`` over elements at least as large as the reference's RMS (an element near zero
has a huge relative error from any absolute one, which says nothing about the tensor);
``rel_rms = ||y - ref|| / ||ref||``; ``cosine`` similarity of the flattened tensors.
Quantizers report how many int8 codes differ.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from . import numerics
from .fp16 import BF16, FP16, FP32, ElementwiseArithmetic, FloatFormat, rsqrt_fp32

__all__ = ["FORMATS", "error_metrics", "error_report", "format_report", "rsqrt_error",
           "activation_sweep", "storage_error", "fixed16_round"]

#: e8m10: fp16's precision with fp32's exponent range -- what subnormals and a wider range
#: would buy, measured apart from precision.
FORMATS = {"fp16": FP16, "bf16": BF16, "e8m10": FloatFormat("e8m10", exponent_bits=8,
                                                            precision=11), "fp32": FP32}
#: A residual-stream outlier of the size reported for LLaMA-class models ("massive
#: activations", about 2,600 in LLaMA2-7B: Sun et al., 2024). The tiny random model has none,
#: so the storage study also sizes fixed point for one, as a real checkpoint would need.
MASSIVE_ACTIVATION = 2600.0
OUTLIER_CASE = "residual stream, fixed point sized for a 2600 outlier"


def error_metrics(y, ref) -> dict:
    """``max_abs``, ``max_rel``, ``rel_rms``, ``cosine`` and ``n`` of ``y`` against ``ref``."""
    y = np.asarray(y, dtype=np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    err = np.abs(y - ref)
    mag = np.abs(ref)
    ref_norm, y_norm = np.linalg.norm(ref), np.linalg.norm(y)
    keep = (mag >= ref_norm / math.sqrt(mag.size)) & (mag > 0) if mag.size else mag > 0
    return {
        "max_abs": float(err.max()) if err.size else 0.0,
        "max_rel": float((err[keep] / mag[keep]).max()) if keep.any() else 0.0,
        "rel_rms": float(np.linalg.norm(y - ref) / ref_norm) if ref_norm > 0 else 0.0,
        "cosine": float(y @ ref / (y_norm * ref_norm)) if y_norm > 0 and ref_norm > 0 else 1.0,
        "n": int(y.size),
    }


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _golden_dequant(linear, acc: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """The golden layer's float32 dequantization of integer sums ``acc`` whose activation
    scale is ``127 / absmax`` (``TernaryLinear.forward``'s arithmetic order)."""
    act_scale = numerics.ACT_MAX / _t(absmax).clamp(min=numerics.QUANT_EPS)
    acc = _t(acc)
    if linear.float_order == "bitlinear":
        return (acc / (linear.weight_scale * act_scale)).numpy()
    return ((acc / act_scale) * linear.weight_scale).numpy()


def _capture_residuals(model, ids) -> list[torch.Tensor]:
    """The residual stream entering each layer's FFN (post_attention_layernorm's input)."""
    captured = {}
    handles = []
    for i, layer in enumerate(model.layers):
        def hook(module, args, i=i):
            captured[i] = args[0].detach().clone()
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(hook))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i].reshape(-1, captured[i].shape[-1]) for i in range(len(model.layers))]


def _float_linear(linear, x: torch.Tensor) -> torch.Tensor:
    """A ternary linear without activation quantization: ``x @ (values * scale).T``."""
    return F.linear(x, linear.values.float() * linear.scale)


def _ffn(model, layer_index: int, h: torch.Tensor, arith: ElementwiseArithmetic, pool):
    """One FFN block both ways; appends ``(y, ref)`` pairs to ``pool[op]``; returns range
    statistics of the hardware run."""
    fmt = arith.fmt
    layer = model.layers[layer_index]
    mlp = layer.mlp
    eps = model.config.rms_norm_eps
    relu2 = model.config.hidden_act == "relu2"

    def linear(x, lin):
        """Quantize, exact TLMM sums, dequantize; records the ops; returns the output and
        the int8 codes."""
        codes, absmax = arith.quantize_int8(x)
        ref_codes, _ = numerics.int8_quantize(_t(x))
        pool["quantize_int8 (codes)"].append((codes, ref_codes.numpy()))
        acc = numerics.ternary_matmul(codes, lin.values)
        y = arith.dequantize(acc, arith.dequant_scale(absmax, float(lin.scale)))
        pool["dequantize"].append((y, _golden_dequant(lin, acc, absmax)))
        pool["linear (quantize, TLMM, dequantize)"].append((y, lin(_t(x)).numpy()))
        return y, codes

    def act(g):
        return F.relu(g).square() if relu2 else F.silu(g)

    with torch.no_grad():
        # Reference: the golden modules in FeedForward's order, float32 throughout.
        x_ref = layer.post_attention_layernorm(h)
        n_ref = mlp.ffn_sub_norm(act(mlp.gate_proj(x_ref)) * mlp.up_proj(x_ref))
        branch_ref = mlp.down_proj(n_ref)
        assert torch.equal(branch_ref, mlp(x_ref))
        # Yardstick: the same block with float activations into the linears (no int8).
        n_float = mlp.ffn_sub_norm(act(_float_linear(mlp.gate_proj, x_ref))
                                   * _float_linear(mlp.up_proj, x_ref))
        pool["golden with float activations (int8 yardstick)"].append(
            (branch_ref.numpy(), _float_linear(mlp.down_proj, n_float).numpy()))

        # Hardware numerics.
        h_f = arith.from_float(h.numpy())
        pool["store residual"].append((h_f, h.numpy()))
        w_norm = arith.from_float(layer.post_attention_layernorm.weight.numpy())
        w_sub = arith.from_float(mlp.ffn_sub_norm.weight.numpy())
        x = arith.rmsnorm(h_f, w_norm, eps)
        pool["rmsnorm"].append((x, layer.post_attention_layernorm(_t(h_f)).numpy()))
        g, codes_in = linear(x, mlp.gate_proj)
        u, _ = linear(x, mlp.up_proj)
        g32 = _t(g)
        if relu2:
            a = arith.relu2(g)
            pool["relu2"].append((a, F.relu(g32).square().numpy()))
            pool["silu"].append((arith.silu(g), F.silu(g32).numpy()))
        else:
            a = arith.silu(g)
            pool["silu"].append((a, F.silu(g32).numpy()))
        p = arith.gate_mul(a, u)
        pool["gate_mul"].append((p, (_t(a) * _t(u)).numpy()))
        n = arith.rmsnorm(p, w_sub, eps)
        pool["rmsnorm"].append((n, mlp.ffn_sub_norm(_t(p)).numpy()))
        d, codes_sub = linear(n, mlp.down_proj)
        out = arith.residual_add(h_f, d)
        pool["residual_add"].append((out, (_t(h_f) + _t(d)).numpy()))
        pool["FFN branch (vs FeedForward)"].append((d, branch_ref.numpy()))
        pool["FFN block + residual"].append((out, (h + branch_ref).numpy()))
        pool["int8 codes along the block (vs golden's)"] += [
            (codes_in, numerics.int8_quantize(x_ref)[0].numpy()),
            (codes_sub, numerics.int8_quantize(n_ref)[0].numpy())]

    values = [h_f, x, g, u, a, p, n, d, out]
    h_np = h.numpy()
    nonzero_h = np.abs(h_np)[h_np != 0]
    return {
        "residual_max": float(np.abs(h_np).max()),
        "residual_min_nonzero": float(nonzero_h.min()) if nonzero_h.size else 0.0,
        "residual_flushed": int(np.count_nonzero((np.abs(h_np) < fmt.min_normal)
                                                 & (h_np != 0))),
        "residual_values": int(h_np.size),
        "gate_up_product_max": float(np.abs(p).max()),
        "gate_up_flushed": int(np.count_nonzero((p == 0) & (a * u != 0))),
        "gate_up_values": int(p.size),
        "saturated": int(sum(np.count_nonzero(np.abs(v) >= fmt.max_value) for v in values)),
    }


def fixed16_round(x: np.ndarray, max_abs: float) -> np.ndarray:
    """16-bit two's-complement fixed point whose binary point is set for ``max_abs`` (the
    largest power-of-two range that holds it), round half to even, saturating."""
    step = 2.0 ** (math.ceil(math.log2(max_abs)) - 15)
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) / step), -32768, 32767) * step


def storage_error(tensors: dict, ranges: dict | None = None) -> dict:
    """Storing each float32 tensor in fp16, bf16 and 16-bit fixed point (one binary point
    per tensor, set by its largest value over all layers and tokens, or by ``ranges[name]``):
    ``error_metrics`` of each, plus the share of nonzero elements that read back as zero."""
    out = {}
    ranges = ranges or {}
    for name, t in tensors.items():
        t = np.asarray(t, dtype=np.float64)
        max_abs = ranges.get(name, np.abs(t).max())
        nonzero = t != 0
        out[name] = {}
        for fmt_name, y in (("fp16", FP16.round(t)), ("bf16", BF16.round(t)),
                            ("fixed16", fixed16_round(t, max_abs))):
            m = error_metrics(y, t)
            m["zeroed"] = float(np.count_nonzero((y == 0) & nonzero) / max(1, nonzero.sum()))
            out[name][fmt_name] = m
    return out


def rsqrt_error(step: int = 7) -> dict:
    """Worst relative error of ``rsqrt_fp32`` over every ``step``-th fp32 mantissa of two
    binades (even and odd exponent: the whole table), against float64."""
    mant = np.arange(0, 1 << 23, step, dtype=np.float64)
    worst, mean = 0.0, 0.0
    for e in (0, 1):
        v = np.ldexp(1.0 + mant / (1 << 23), e)
        rel = np.abs(rsqrt_fp32(v) * np.sqrt(v) - 1.0)
        worst = max(worst, float(rel.max()))
        mean += float(rel.mean()) / 2
    return {"max_rel": worst, "log2_max_rel": math.log2(worst), "mean_rel": mean,
            "samples": 2 * mant.size}


def activation_sweep(fmt: FloatFormat = FP16, limit: float = 16.0) -> dict:
    """relu2 and SiLU on every number of ``fmt`` in ``[-limit, limit]`` (a 2**20-point grid
    for wider formats) against float64 ``relu(x)**2`` and ``x * sigmoid(x)``: the max abs
    error, and the max error in ulps of the result where ``|ref| >= 2**-6`` (below, outputs
    are near zero or flushed and only the absolute error means anything)."""
    arith = ElementwiseArithmetic(fmt)
    if fmt.width == 16:
        x = fmt.decode(np.arange(1 << 16, dtype=np.uint32))
    else:
        x = np.linspace(-limit, limit, 1 << 20)
    x = np.unique(arith.from_float(x[np.abs(x) <= limit]))
    out = {}
    for name, y, ref in (("relu2", arith.relu2(x), np.maximum(x, 0) ** 2),
                         ("silu", arith.silu(x), x / (1 + np.exp(-x)))):
        err = np.abs(y - ref)
        big = np.abs(ref) >= 2.0 ** -6
        ulp = np.ldexp(1.0, np.frexp(np.abs(ref[big]))[1] - fmt.precision)
        out[name] = {"max_abs": float(err.max()), "max_ulp": float((err[big] / ulp).max()),
                     "n": int(x.size)}
    return out


def error_report(model=None, *, tokens: int = 64, seed: int = 0,
                 formats=("fp16", "bf16", "e8m10", "fp32")) -> dict:
    """Measure the element-wise numerics on ``model``'s FFN blocks (default: the tiny
    checkpoint, ``build_tiny_checkpoint``) over ``tokens`` random token ids.

    Returns ``{"config", "tokens", "formats": {name: {"ops": {op: metrics}, "range":
    {...}}}, "storage": {tensor: {format: metrics}}, "rsqrt": ..., "sweep": {name: ...}}``
    (see the module docstring for the metrics).
    """
    if model is None:
        from .checkpoint import build_tiny_checkpoint, load_checkpoint
        with tempfile.TemporaryDirectory(prefix="trilut-fp16-error-") as tmp:
            model = load_checkpoint(build_tiny_checkpoint(tmp))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats must be among {list(FORMATS)}, not {unknown[0]!r}")
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (min(tokens, cfg.max_position_embeddings),),
                        generator=gen)
    residuals = _capture_residuals(model, ids)
    with torch.no_grad():
        products = []
        for layer, h in zip(model.layers, residuals):
            x = layer.post_attention_layernorm(h)
            g = layer.mlp.gate_proj(x)
            g = F.relu(g).square() if cfg.hidden_act == "relu2" else F.silu(g)
            products.append((g * layer.mlp.up_proj(x)).numpy().ravel())

    report = {"config": {"hidden_size": cfg.hidden_size,
                         "intermediate_size": cfg.intermediate_size,
                         "layers": cfg.num_hidden_layers, "hidden_act": cfg.hidden_act},
              "tokens": int(ids.numel()), "formats": {}}
    for name in formats:
        arith = ElementwiseArithmetic(FORMATS[name])
        pool = defaultdict(list)
        ranges = [_ffn(model, i, h, arith, pool) for i, h in enumerate(residuals)]
        ops = {}
        for op, pairs in pool.items():
            y = np.concatenate([np.ravel(p[0]) for p in pairs])
            ref = np.concatenate([np.ravel(p[1]) for p in pairs])
            if "codes" in op:
                diff = np.abs(y.astype(np.int64) - ref.astype(np.int64))
                ops[op] = {"flipped": int(np.count_nonzero(diff)), "max_code_diff":
                           int(diff.max()), "n": int(y.size)}
            else:
                ops[op] = error_metrics(y, ref)
        report["formats"][name] = {
            "ops": ops,
            "range": {
                "residual_max": max(r["residual_max"] for r in ranges),
                "residual_min_nonzero": min(r["residual_min_nonzero"] for r in ranges),
                "residual_flushed": sum(r["residual_flushed"] for r in ranges),
                "residual_values": sum(r["residual_values"] for r in ranges),
                "gate_up_product_max": max(r["gate_up_product_max"] for r in ranges),
                "gate_up_flushed": sum(r["gate_up_flushed"] for r in ranges),
                "gate_up_values": sum(r["gate_up_values"] for r in ranges),
                "saturated": sum(r["saturated"] for r in ranges),
            },
        }
    residual = np.concatenate([h.numpy().ravel() for h in residuals])
    report["storage"] = storage_error(
        {"residual stream": residual, "act(gate) * up": np.concatenate(products),
         OUTLIER_CASE: residual},
        ranges={OUTLIER_CASE: MASSIVE_ACTIVATION})
    report["rsqrt"] = rsqrt_error()
    report["sweep"] = {name: activation_sweep(FORMATS[name]) for name in formats
                       if FORMATS[name].width == 16}
    return report


def format_report(report: dict) -> str:
    """Markdown tables of an ``error_report``."""
    lines = []
    cfg = report["config"]
    lines.append(f"Model: hidden {cfg['hidden_size']}, FFN {cfg['intermediate_size']}, "
                 f"{cfg['layers']} layers, {cfg['hidden_act']}; {report['tokens']} tokens.")
    names = list(report["formats"])
    ops = list(report["formats"][names[0]]["ops"])
    for name in names:
        lines += ["", f"**{name}**", "",
                  "| op | max abs | max rel | rel rms | cosine |", "|---|---|---|---|---|"]
        for op in ops:
            m = report["formats"][name]["ops"][op]
            if "flipped" in m:
                lines.append(f"| {op} | {m['flipped']} of {m['n']} codes differ, "
                             f"max by {m['max_code_diff']} | | | |")
            else:
                lines.append(f"| {op} | {m['max_abs']:.3g} | {m['max_rel']:.3g} | "
                             f"{m['rel_rms']:.3g} | {1 - m['cosine']:.2e} (1 - cos) |")
        r = report["formats"][name]["range"]
        lines.append("")
        lines.append(f"range: residual |h| max {r['residual_max']:.3g}, min nonzero "
                     f"{r['residual_min_nonzero']:.3g} ({r['residual_flushed']} of "
                     f"{r['residual_values']} flushed); "
                     f"max |act(gate) * up| {r['gate_up_product_max']:.3g} "
                     f"({r['gate_up_flushed']} of {r['gate_up_values']} flushed); "
                     f"saturated values {r['saturated']}")
    lines += ["", "Storing the float tensors in 16 bits:", "",
              "| tensor | format | rel rms | max rel | zeroed |", "|---|---|---|---|---|"]
    for tensor, by_format in report["storage"].items():
        for fmt_name, m in by_format.items():
            lines.append(f"| {tensor} | {fmt_name} | {m['rel_rms']:.3g} | {m['max_rel']:.3g} |"
                         f" {100 * m['zeroed']:.2f}% |")
    rs = report["rsqrt"]
    lines += ["", f"rsqrt_fp32: max rel error {rs['max_rel']:.3g} (2^{rs['log2_max_rel']:.1f}),"
              f" mean {rs['mean_rel']:.3g}, over {rs['samples']} inputs"]
    for name, sweep in report.get("sweep", {}).items():
        for op, m in sweep.items():
            lines.append(f"{name} {op} on all {m['n']} numbers in [-16, 16]: max abs error "
                         f"{m['max_abs']:.3g}; max {m['max_ulp']:.2f} ulp where |result| >= 2^-6")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_report(error_report()))
