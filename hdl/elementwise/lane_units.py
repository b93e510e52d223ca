"""Per-lane fused element-wise stream units, bit-exact with ``models/fp16.py``.

These sit in the stream around the ternary matmul (docs/lane_units.md): the dequantizer
right behind the TLMM engine's ``results``, then the gated activation and, after the down
projection, the residual add. fp16 values move as streams of ``L`` lanes per beat, payload
``lane_layout(L)`` = ``data.ArrayLayout(unsigned(16), L)`` of fp16 codes (lane ``i`` at bits
``16 i .. 16 i + 15``).

Stream protocol, every unit: ``amaranth.lib.stream`` valid/ready; a beat moves on a clock
edge where both are high. Every pipeline stage has its own valid bit and takes a new beat
when it is empty or its beat moves on (``load = ~valid | load of the next stage``), so
backpressure on the output stalls the pipeline from the back, bubbles are squeezed out, and
nothing is dropped or duplicated. Output ``valid`` and payload are registers. A unit with two
input streams joins them beat by beat: beat ``i`` of one pairs with beat ``i`` of the other,
and neither is taken without the other.

Latency (``latency``): a beat taken on clock edge ``e`` is offered on the output right after
edge ``e + latency - 1`` and can leave on edge ``e + latency``; throughput one beat per cycle.
Each stage holds one of the combinational units of ``trilut.hdl.elementwise.fp16`` (an fp16 multiply or
add: a DSP48E2 product plus its normalize-and-round), see docs/lane_units.md for timing.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import EngineConfig
from trilut.hdl.elementwise.fp16 import Fp16Add, Fp16Mul
# The fp16 rounding rules' two building blocks (priority encoder; flush/saturate/pack), shared
# with the arithmetic units rather than copied, so the contract lives in one place.
from trilut.hdl.elementwise.fp16 import _pack, leading_zeros
from trilut.hdl.linear.tlmm_engine import N_GROUPS_WIDTH
from trilut.models import fp16 as fp

__all__ = ["lane_layout", "lane_signature", "DequantScale", "Dequantizer", "GatedActivation",
           "ResidualAdd", "ACTIVATIONS"]

#: The gated activations of the model family: squared ReLU (bitnet-b1.58-2B-4T) and SiLU
#: (bitnet_b1_58).
ACTIVATIONS = ("relu2", "silu")

_MANT = fp.FP16.mantissa_bits                   # 10
_BIAS = fp.FP16.bias                            # 15
_F32_MANT = fp.FP32.mantissa_bits               # 23
_F32_BIAS = fp.FP32.bias                        # 127
_F32_EXP_MAX = 2 * _F32_BIAS                    # 254
_ACT_MAX = 127                                  # numerics.ACT_MAX: A / 127 is the act scale
_FP16_ONE = int(fp.fp16_from_float(1.0))
_FP16_HALF = int(fp.fp16_from_float(0.5))
_FP16_QUARTER = int(fp.fp16_from_float(0.25))


def lane_layout(lanes: int) -> data.ArrayLayout:
    """``lanes`` fp16 codes per beat."""
    _check_lanes(lanes)
    return data.ArrayLayout(unsigned(16), lanes)


def lane_signature(lanes: int) -> stream.Signature:
    """A stream of ``lane_layout(lanes)`` beats."""
    return stream.Signature(lane_layout(lanes))


def _check_lanes(lanes) -> None:
    if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= 256:
        raise ValueError(f"lanes must be an integer from 1 to 256, not {lanes!r}")


class _Pipeline:
    """Valid bits and enables of ``depth`` register stages in a row, with backpressure.

    ``load[k]``: stage ``k`` may take a beat this cycle (it is empty, or its beat moves on);
    ``take[k] = load[k] & (valid of what feeds it)`` is the data registers' enable. The
    ``load`` chain is combinational from ``out_ready`` to ``in_ready`` (one LUT level a stage).
    """

    def __init__(self, m: Module, depth: int, *, in_valid, out_ready, name: str):
        self.valid = [Signal(name=f"{name}{k + 1}_valid") for k in range(depth)]
        self.load = [Signal(name=f"{name}{k + 1}_load") for k in range(depth)]
        self.take = [Signal(name=f"{name}{k + 1}_take") for k in range(depth)]
        for k in reversed(range(depth)):
            downstream = out_ready if k == depth - 1 else self.load[k + 1]
            upstream = in_valid if k == 0 else self.valid[k - 1]
            m.d.comb += [self.load[k].eq(~self.valid[k] | downstream),
                         self.take[k].eq(self.load[k] & upstream)]
            with m.If(self.load[k]):
                m.d.sync += self.valid[k].eq(upstream)

    @property
    def in_ready(self):
        return self.load[0]

    @property
    def out_valid(self):
        return self.valid[-1]


def _join(m: Module, a: stream.Interface, b: stream.Interface, *, ready, valid) -> None:
    """Pair beat ``i`` of ``a`` with beat ``i`` of ``b``: both move together, when ``ready``.
    Drives the joined ``valid``. Each stream's ``ready`` depends on the other's ``valid``
    (allowed: a sink's ready may depend on valid), never on its own."""
    m.d.comb += [valid.eq(a.valid & b.valid),
                 a.ready.eq(ready & b.valid),
                 b.ready.eq(ready & a.valid)]


# --------------------------------------------------------------------------------------------
# Dequantization: acc * S per lane, S = round32(A * w / 127) once per row.


class DequantScale(wiring.Component):
    """The once-per-row scalar path: ``scale = round32(absmax * w / 127)``
    (``models.fp16.fp16_dequant_scale``), sequential.

    * ``absmax`` in: one fp16 code per row, the row's absmax ``A`` from the quantizer.
    * ``weight_scale``: the tensor's fp32 weight scale ``w`` as fp32 bits (a register; hold it
      while rows are in flight). A code with exponent 255 reads as the finite binade
      ``2**128 (1 + m)``, which the model rounds to the fp32 maximum, and so does this unit.
    * ``scale`` out: the row's fp32 scale code; a one-beat output register.

    How: the 11 x 24-bit significand product (exact, 35 bits; one DSP48E2) is divided by the
    constant 127 by restoring long division, ``DIVIDE_BITS`` quotient bits a cycle (two 8-bit
    compare-subtracts in a row), so the quotient and remainder are exact; then one
    round-to-nearest-even of the quotient, with the remainder in the sticky bit.

    Timing: ``absmax`` is taken in an idle cycle, on the edge that registers the product; the
    scale is in the output register ``latency`` = 16 edges later (15 division steps, then the
    rounding). It waits in the working registers while the output still holds the previous
    row's scale, so one scale is computed ahead (double buffering). The next ``absmax`` is
    taken the cycle after the result moved to the output: at most one row every
    ``interval`` = 17 cycles.
    """

    #: Quotient bits per division step.
    DIVIDE_BITS = 2
    #: ``A * w`` has 35 bits; its top 5 are below 127, so they seed the remainder.
    _PRODUCT_BITS = 35
    _SEED_BITS = 5
    _STEPS = (_PRODUCT_BITS - _SEED_BITS) // DIVIDE_BITS
    #: Edges from taking ``absmax`` to the scale being in the output register (the division
    #: steps and the rounding); it is offered right after.
    latency = 1 + _STEPS
    #: Fewest cycles between two ``absmax`` beats (the unit is busy in between).
    interval = latency + 1

    def __init__(self):
        super().__init__({
            "absmax": In(stream.Signature(unsigned(16))),
            "weight_scale": In(unsigned(32)),
            "scale": Out(stream.Signature(unsigned(32))),
        })

    def elaborate(self, platform):
        m = Module()
        a, w = self.absmax.payload, self.weight_scale
        dividend_bits = self._PRODUCT_BITS - self._SEED_BITS          # 30

        # The weight scale as the model reads it: exponent 0 is zero, exponent 255 saturates.
        w_exp = w[_F32_MANT:31]
        w_inf = w_exp == 0xFF
        w_sig = Mux(w_inf, (1 << 24) - 1, Cat(w[:_F32_MANT], 1))
        w_exp_eff = Mux(w_inf, _F32_EXP_MAX, w_exp)
        a_exp = a[_MANT:15]
        product = Signal(self._PRODUCT_BITS)
        m.d.comb += product.eq(Cat(a[:_MANT], 1) * w_sig)             # in [2**33, 2**35)

        dividend = Signal(dividend_bits)
        remainder = Signal(7)                                          # always < 127
        quotient = Signal(dividend_bits)                               # floor(A*w / 127) < 2**29
        exp_sum = Signal(9)
        sign = Signal()
        zero = Signal()
        step = Signal(range(self._STEPS))

        out_valid = Signal()
        out_payload = Signal(32)
        m.d.comb += [self.scale.valid.eq(out_valid), self.scale.payload.eq(out_payload)]
        out_free = ~out_valid | self.scale.ready
        with m.If(self.scale.ready):
            m.d.sync += out_valid.eq(0)

        # One restoring-division step per quotient bit: shift in a dividend bit, subtract 127
        # if it fits. The remainder stays below 127, so 8 bits hold every partial remainder.
        partial = remainder
        bits = []
        for i in range(self.DIVIDE_BITS):
            shifted = Cat(dividend[dividend_bits - 1 - i], partial)   # 8 bits
            fits = shifted >= _ACT_MAX
            bits.append(fits)
            partial = Mux(fits, shifted - _ACT_MAX, shifted)[:7]

        with m.FSM(name="scale_fsm"):
            with m.State("IDLE"):
                m.d.comb += self.absmax.ready.eq(1)
                with m.If(self.absmax.valid):
                    m.d.sync += [
                        dividend.eq(product[:dividend_bits]),
                        remainder.eq(product[dividend_bits:]),
                        quotient.eq(0),
                        exp_sum.eq(a_exp + w_exp_eff),
                        sign.eq(a[15] ^ w[31]),
                        zero.eq((a_exp == 0) | (w_exp == 0)),
                        step.eq(0),
                    ]
                    m.next = "DIVIDE"
            with m.State("DIVIDE"):
                m.d.sync += [
                    dividend.eq(dividend << self.DIVIDE_BITS),
                    remainder.eq(partial),
                    quotient.eq(Cat(*reversed(bits), quotient)),
                    step.eq(step + 1),
                ]
                with m.If(step == self._STEPS - 1):
                    m.next = "ROUND"
            with m.State("ROUND"):
                with m.If(out_free):
                    m.d.sync += [out_valid.eq(1),
                                 out_payload.eq(self._round(m, quotient, remainder, exp_sum,
                                                            sign, zero))]
                    m.next = "IDLE"
        return m

    @staticmethod
    def _round(m: Module, quotient, remainder, exp_sum, sign, zero) -> Signal:
        """fp32 code of ``quotient + remainder/127`` times ``2**(exp_sum - 175)``.

        ``A * w / 127 = (P / 127) * 2**(eA - 25 + ew - 150)`` and ``P / 127`` lies in
        ``[2**26, 2**28.02)``: its leading one is bit 26, 27 or 28 of the quotient.
        """
        code = Signal(32, name="scale_code")
        kept, guard, sticky = Signal(24), Signal(), Signal()
        lead = Signal(range(29))
        for position in (26, 27, 28):       # later wins: the highest set bit
            with m.If(quotient[position]):
                m.d.comb += [lead.eq(position),
                             kept.eq(quotient[position - 23:position + 1]),
                             guard.eq(quotient[position - 24]),
                             sticky.eq(quotient[:position - 24].any() | (remainder != 0))]
        rounded = Signal(25)
        m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
        exponent = Signal(signed(11))
        m.d.comb += exponent.eq(exp_sum + lead - 48 + rounded[24])
        with m.If(zero | (exponent < 1)):
            m.d.comb += code.eq(Cat(Const(0, 31), sign))
        with m.Elif(exponent > _F32_EXP_MAX):
            m.d.comb += code.eq(Cat(Const(fp.FP32.max_code, 31), sign))
        with m.Else():
            m.d.comb += code.eq(Cat(rounded[:_F32_MANT], exponent[:8], sign))
        return code

    def model(self, absmax, weight_scale) -> np.ndarray:
        """fp16 ``absmax`` codes, fp32 ``weight_scale`` code -> fp32 scale codes."""
        return fp.fp16_dequant_scale(absmax, fp.fp32_to_float(np.uint32(weight_scale)))


class Dequantizer(wiring.Component):
    """TLMM accumulators -> fp16: ``y = round(acc * S)`` per lane, ``S`` the row's fp32
    scale ``round32(A * w / 127)`` (``fp16_dequantize`` of ``fp16_dequant_scale``).

    Streams and inputs:

    * ``acc`` in: the engine's ``results`` beats (``wiring.connect`` them directly): ``C``
      signed accumulators of ``acc_width`` bits, ``n_groups`` beats per row, in column order.
    * ``absmax`` in: one fp16 code per row, the row's absmax ``A`` from the quantizer. It may
      (and should) arrive ahead of the row: the scale is computed while the previous row
      streams.
    * ``weight_scale``: the tensor's weight scale ``w``, fp32 bits (see ``DequantScale``).
    * ``n_groups``: beats per row (at least 1), as the engine's; hold it and ``weight_scale``
      constant while rows are in flight.
    * ``y`` out: ``C`` fp16 lanes per beat, one beat per ``acc`` beat, same order.

    Pipeline (``latency`` = 3): normalize ``|acc|`` (leading-zero count and shift) | the
    ``acc_width`` x 24-bit significand product (exact; 2 DSP48E2 a lane at 22 bits) | round
    to 11 bits and pack. The scalar path (``DequantScale``) makes the first beat of a row wait
    until ``scale_latency`` = 17 edges after its ``absmax`` was taken, and a row takes at least
    ``DequantScale.interval`` = 17 cycles: rows of 17 or more groups stream with no bubble
    (the kv260 FFN has 96..256 groups of 16 per row).
    """

    def __init__(self, cfg: EngineConfig):
        if not isinstance(cfg, EngineConfig):
            raise TypeError(f"cfg must be an EngineConfig, not {cfg!r}")
        self.cfg = cfg
        self.lanes = cfg.columns_per_cycle
        self.acc_width = cfg.acc_width
        super().__init__({
            "acc": In(stream.Signature(data.ArrayLayout(signed(self.acc_width), self.lanes))),
            "absmax": In(stream.Signature(unsigned(16))),
            "weight_scale": In(unsigned(32)),
            "n_groups": In(unsigned(N_GROUPS_WIDTH)),
            "y": Out(lane_signature(self.lanes)),
        })

    latency = 3

    @property
    def scale_latency(self) -> int:
        """Edges from taking a row's ``absmax`` to the earliest edge its first beat is taken."""
        return DequantScale.latency + 1

    def expected_cycles(self, rows: int, n_groups: int) -> int:
        """Edges from the first ``absmax`` taken to the last ``y`` beat out, inclusive of
        both, when no stream ever stalls and every ``absmax`` is offered ahead."""
        period = max(n_groups, DequantScale.interval)
        return self.scale_latency + (rows - 1) * period + (n_groups - 1) + self.latency + 1

    def elaborate(self, platform):
        m = Module()
        C, aw = self.lanes, self.acc_width
        m.submodules.scale_unit = scale_unit = DequantScale()
        m.d.comb += [scale_unit.weight_scale.eq(self.weight_scale)]
        wiring.connect(m, wiring.flipped(self.absmax), scale_unit.absmax)
        scale = scale_unit.scale

        pipe = _Pipeline(m, 3, in_valid=self.acc.valid & scale.valid, out_ready=self.y.ready,
                         name="dq")
        taken = self.acc.valid & self.acc.ready

        # Beats of the current row; the row's scale is released with its last beat.
        group = Signal(N_GROUPS_WIDTH)
        last = group + 1 == self.n_groups
        m.d.comb += [self.acc.ready.eq(pipe.in_ready & scale.valid),
                     scale.ready.eq(taken & last)]
        with m.If(taken):
            m.d.sync += group.eq(Mux(last, 0, group + 1))

        # ---- stage 1: sign, |acc| normalized to a leading one at bit aw-1 ---------------
        s1_scale = Signal(32)
        s1_norm = [Signal(aw, name=f"s1_norm{c}") for c in range(C)]
        s1_lz = [Signal(range(aw + 1), name=f"s1_lz{c}") for c in range(C)]
        s1_neg = [Signal(name=f"s1_neg{c}") for c in range(C)]
        s1_zero = [Signal(name=f"s1_zero{c}") for c in range(C)]
        with m.If(pipe.take[0]):
            m.d.sync += s1_scale.eq(scale.payload)
        for c in range(C):
            acc = self.acc.payload[c]
            magnitude = Signal(aw, name=f"magnitude{c}")      # |-2**(aw-1)| fits aw bits
            m.d.comb += magnitude.eq(Mux(acc < 0, -acc, acc))
            lz = leading_zeros(m, magnitude, f"leading_zeros{c}")
            with m.If(pipe.take[0]):
                m.d.sync += [s1_norm[c].eq(magnitude << lz), s1_lz[c].eq(lz),
                             s1_neg[c].eq(acc < 0), s1_zero[c].eq(magnitude == 0)]

        # ---- stage 2: the exact significand product ------------------------------------
        # value = norm * 2**-lz * sig * 2**(es - 150); norm * sig has its leading one at bit
        # aw + 22 or aw + 23, so the fp16 biased exponent is es - lz + aw + 22 - 135 (+ top).
        width = aw + 24
        scale_exp = s1_scale[_F32_MANT:31]
        scale_sig = Cat(s1_scale[:_F32_MANT], 1)
        s2_product = [Signal(width, name=f"s2_product{c}") for c in range(C)]
        s2_exp = [Signal(signed(12), name=f"s2_exp{c}") for c in range(C)]
        s2_sign = [Signal(name=f"s2_sign{c}") for c in range(C)]
        s2_zero = [Signal(name=f"s2_zero{c}") for c in range(C)]
        for c in range(C):
            with m.If(pipe.take[1]):
                m.d.sync += [
                    s2_product[c].eq(s1_norm[c] * scale_sig),
                    s2_exp[c].eq(scale_exp - s1_lz[c] + (aw + 22 - _F32_BIAS - _F32_MANT
                                                          + _BIAS)),
                    s2_sign[c].eq(s1_neg[c] ^ s1_scale[31]),
                    s2_zero[c].eq(s1_zero[c] | (scale_exp == 0)),
                ]

        # ---- stage 3: round once to 11 bits, flush or saturate, pack --------------------
        out = Signal(lane_layout(C))
        for c in range(C):
            p = s2_product[c]
            top = p[width - 1]
            kept, guard, sticky = (Signal(11, name=f"kept{c}"), Signal(name=f"guard{c}"),
                                   Signal(name=f"sticky{c}"))
            with m.If(top):
                m.d.comb += [kept.eq(p[width - 11:width]), guard.eq(p[width - 12]),
                             sticky.eq(p[:width - 12].any())]
            with m.Else():
                m.d.comb += [kept.eq(p[width - 12:width - 1]), guard.eq(p[width - 13]),
                             sticky.eq(p[:width - 13].any())]
            rounded = Signal(12, name=f"rounded{c}")
            m.d.comb += rounded.eq(kept + (guard & (sticky | kept[0])))
            exponent = Signal(signed(13), name=f"exponent{c}")
            m.d.comb += exponent.eq(s2_exp[c] + top + rounded[11])
            code = Signal(16, name=f"code{c}")
            _pack(m, code, s2_sign[c], exponent, rounded, s2_zero[c])
            with m.If(pipe.take[2]):
                m.d.sync += out[c].eq(code)
        m.d.comb += [self.y.valid.eq(pipe.out_valid), self.y.payload.eq(out)]
        return m

    def model(self, acc, absmax, weight_scale) -> np.ndarray:
        """``acc[rows, n]`` integers, ``absmax[rows]`` fp16 codes, ``weight_scale`` fp32 code
        -> fp16 codes ``[rows, n]``."""
        acc = np.asarray(acc)
        scale = fp.fp16_dequant_scale(absmax, fp.fp32_to_float(np.uint32(weight_scale)))
        return fp.fp16_dequantize(acc, np.asarray(scale)[..., None])


# --------------------------------------------------------------------------------------------
# The gated activation: act(gate) * up.


class GatedActivation(wiring.Component):
    """``y = round(act(gate) * up)`` per lane: ``fp16_gate_mul(fp16_relu2(gate), up)`` or
    ``fp16_gate_mul(fp16_silu(gate), up)``, the models' exact rounding sequence.

    * ``gate``, ``up`` in: ``lanes`` fp16 codes per beat; beat ``i`` of ``gate`` pairs with
      beat ``i`` of ``up`` (the gate and up projections of the same columns).
    * ``y`` out: ``lanes`` fp16 codes per beat, one per input pair.

    ``relu2`` (``latency`` 2): ``round(r * r)`` with ``r = gate`` if ``gate > 0`` else +0 |
    the gate multiply. 2 DSP48E2 a lane.

    ``silu`` (``latency`` 5): the sigmoid table read (sign, binade, top 5 mantissa bits of
    ``gate``: 512 x (a, b) fp16, one RAMB18 a lane) and the segment offset ``t`` (the
    mantissa bits below the segment index, exact, a 5-bit normalize) | ``round(a t)`` |
    ``u = round(a t + b)`` | ``round(gate * u * 2**-k)`` | the gate multiply. The SiLU multiply
    is one ``Fp16Mul`` followed by an exponent decrement of ``k``: where ``k > 0``,
    ``1/16 <= |gate| < 16`` and ``0.53 <= u <= 2804``, so ``gate * u`` (at most 22,432) stays
    in the normal range; rounding before the ``2**-k`` scale then equals rounding after it,
    and the flush is decided on the decremented exponent (the tests check all
    65,536 gate codes). 3 DSP48E2 a lane.
    """

    def __init__(self, *, lanes: int, activation: str):
        _check_lanes(lanes)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"not {activation!r}")
        self.lanes = lanes
        self.activation = activation
        super().__init__({
            "gate": In(lane_signature(lanes)),
            "up": In(lane_signature(lanes)),
            "y": Out(lane_signature(lanes)),
        })

    @property
    def latency(self) -> int:
        return 2 if self.activation == "relu2" else 5

    def elaborate(self, platform):
        m = Module()
        L = self.lanes
        joined = Signal()
        pipe = _Pipeline(m, self.latency, in_valid=joined, out_ready=self.y.ready,
                         name=self.activation)
        _join(m, self.gate, self.up, ready=pipe.in_ready, valid=joined)
        if self.activation == "relu2":
            act, up = self._relu2(m, pipe)
        else:
            act, up = self._silu(m, pipe)

        # ---- last stage: the gate multiply -----------------------------------------------
        out = Signal(lane_layout(L))
        for c in range(L):
            m.submodules[f"gate_mul{c}"] = mul = Fp16Mul()
            m.d.comb += [mul.a.eq(act[c]), mul.b.eq(up[c])]
            with m.If(pipe.take[-1]):
                m.d.sync += out[c].eq(mul.y)
        m.d.comb += [self.y.valid.eq(pipe.out_valid), self.y.payload.eq(out)]
        return m

    def _relu2(self, m, pipe):
        L = self.lanes
        act = [Signal(16, name=f"s1_act{c}") for c in range(L)]
        up = Signal(lane_layout(L), name="s1_up")
        with m.If(pipe.take[0]):
            m.d.sync += up.eq(self.up.payload)
        for c in range(L):
            g = self.gate.payload[c]
            positive = ~g[15] & (g[_MANT:15] != 0)        # a subnormal reads as zero
            r = Mux(positive, g, 0)
            m.submodules[f"square{c}"] = square = Fp16Mul()
            m.d.comb += [square.a.eq(r), square.b.eq(r)]
            with m.If(pipe.take[0]):
                m.d.sync += act[c].eq(square.y)
        return act, up

    def _silu(self, m, pipe):
        L = self.lanes
        a_tab, b_tab, shift_tab = fp.FP16_ARITH.silu_coefficients
        # ROM word: a in the low 16 bits, b in the high; index (negative, binade, segment).
        words = (fp.FP16.encode(a_tab).astype(np.int64)
                 | fp.FP16.encode(b_tab).astype(np.int64) << 16).reshape(-1)
        binades = a_tab.shape[1]
        seg_bits = fp.SILU_SEGMENT_BITS
        low_exp = fp.SILU_LOW_EXPONENT + _BIAS             # biased exponent of the first binade
        high_exp = fp.SILU_HIGH_EXPONENT + _BIAS
        index_width = 1 + (binades - 1).bit_length() + seg_bits
        assert len(words) == 1 << index_width

        # ---- stage 1: classify, table read, offset t --------------------------------------
        x1 = Signal(lane_layout(L), name="s1_x")
        up1 = Signal(lane_layout(L), name="s1_up")
        with m.If(pipe.take[0]):
            m.d.sync += [x1.eq(self.gate.payload), up1.eq(self.up.payload)]
        low1 = [Signal(name=f"s1_low{c}") for c in range(L)]
        high1 = [Signal(name=f"s1_high{c}") for c in range(L)]
        t1 = [Signal(16, name=f"s1_t{c}") for c in range(L)]
        k1 = [Signal(5, name=f"s1_shift{c}") for c in range(L)]
        rom_data = []
        for c in range(L):
            # One table per lane: a RAMB18 each. (Two lanes could share one through its two
            # ports; yosys maps a two-port ROM to LUTs, Vivado to one RAMB18.)
            m.submodules[f"sigmoid_table{c}"] = rom = Memory(
                shape=unsigned(32), depth=len(words), init=words.tolist())
            port = rom.read_port(domain="sync")
            g = self.gate.payload[c]
            exp, mant, neg = g[_MANT:15], g[:_MANT], g[15]
            binade = (exp - low_exp)[:binades.bit_length() - 1]
            segment = mant[_MANT - seg_bits:]
            low = exp < low_exp
            high = exp >= high_exp
            m.d.comb += [port.addr.eq(Cat(segment, binade, neg)), port.en.eq(pipe.take[0])]
            rom_data.append(port.data)

            # t = |x| - m0 = (mant mod 32) * 2**(e - 10): its leading one at bit j of the low
            # bits gives biased exponent exp - 10 + j (>= 1 inside the table's range).
            low_bits = mant[:_MANT - seg_bits]
            lz = leading_zeros(m, low_bits, f"offset_zeros{c}")
            offset = Signal(16, name=f"offset{c}")
            with m.If(low_bits != 0):
                normalized = (low_bits << lz)[:len(low_bits)]    # leading one at bit 4
                t_exp = exp - _MANT + (len(low_bits) - 1) - lz
                m.d.comb += offset.eq(Cat(Const(0, _MANT + 1 - len(low_bits)), normalized[:-1],
                                          t_exp[:5], Const(0, 1)))
            # |x| below 2**-4: t = |x| (a subnormal is flushed by the multiply that reads it).
            t = Mux(low, g[:15], Mux(high, 0, offset))
            shift = Signal(5, name=f"shift{c}")
            with m.Switch(Cat(binade, neg)):
                for key in range(2 * binades):
                    with m.Case(key):
                        m.d.comb += shift.eq(int(shift_tab[key // binades, key % binades]))
            with m.If(pipe.take[0]):
                m.d.sync += [low1[c].eq(low), high1[c].eq(high), t1[c].eq(t),
                             k1[c].eq(Mux(low | high, 0, shift))]

        # ---- stage 2: a * t ------------------------------------------------------------
        x2, up2 = Signal(lane_layout(L), name="s2_x"), Signal(lane_layout(L), name="s2_up")
        at2 = [Signal(16, name=f"s2_at{c}") for c in range(L)]
        b2 = [Signal(16, name=f"s2_b{c}") for c in range(L)]
        k2 = [Signal(5, name=f"s2_shift{c}") for c in range(L)]
        with m.If(pipe.take[1]):
            m.d.sync += [x2.eq(x1), up2.eq(up1)]
        for c in range(L):
            x = x1[c]
            negative = x[15] & (x[_MANT:15] != 0)          # x < 0 (a subnormal reads as -0)
            a = Mux(low1[c], Mux(negative, _FP16_QUARTER | 0x8000, _FP16_QUARTER),
                    Mux(high1[c], 0, rom_data[c][:16]))
            b = Mux(low1[c], _FP16_HALF,
                    Mux(high1[c], Mux(x[15], 0, _FP16_ONE), rom_data[c][16:]))
            m.submodules[f"slope_mul{c}"] = mul = Fp16Mul()
            m.d.comb += [mul.a.eq(a), mul.b.eq(t1[c])]
            with m.If(pipe.take[1]):
                m.d.sync += [at2[c].eq(mul.y), b2[c].eq(b), k2[c].eq(k1[c])]

        # ---- stage 3: u = a * t + b ------------------------------------------------------
        x3, up3 = Signal(lane_layout(L), name="s3_x"), Signal(lane_layout(L), name="s3_up")
        u3 = [Signal(16, name=f"s3_u{c}") for c in range(L)]
        k3 = [Signal(5, name=f"s3_shift{c}") for c in range(L)]
        with m.If(pipe.take[2]):
            m.d.sync += [x3.eq(x2), up3.eq(up2)]
        for c in range(L):
            m.submodules[f"intercept_add{c}"] = add = Fp16Add()
            m.d.comb += [add.a.eq(at2[c]), add.b.eq(b2[c])]
            with m.If(pipe.take[2]):
                m.d.sync += [u3[c].eq(add.y), k3[c].eq(k2[c])]

        # ---- stage 4: silu = round(x * u) * 2**-k ----------------------------------------
        act4 = [Signal(16, name=f"s4_act{c}") for c in range(L)]
        up4 = Signal(lane_layout(L), name="s4_up")
        with m.If(pipe.take[3]):
            m.d.sync += up4.eq(up3)
        for c in range(L):
            m.submodules[f"silu_mul{c}"] = mul = Fp16Mul()
            m.d.comb += [mul.a.eq(x3[c]), mul.b.eq(u3[c])]
            p = mul.y
            exponent = Signal(signed(7), name=f"silu_exp{c}")
            m.d.comb += exponent.eq(p[_MANT:15] - k3[c])
            with m.If(pipe.take[3]):
                m.d.sync += act4[c].eq(Mux(exponent < 1, Cat(Const(0, 15), p[15]),
                                           Cat(p[:_MANT], exponent[:5], p[15])))
        return act4, up4

    def model(self, gate, up) -> np.ndarray:
        act = fp.fp16_relu2(gate) if self.activation == "relu2" else fp.fp16_silu(gate)
        return fp.fp16_gate_mul(act, up)


# --------------------------------------------------------------------------------------------
# The residual add.


class ResidualAdd(wiring.Component):
    """``y = round(residual + update)`` per lane (``fp16_residual_add``).

    * ``residual``, ``update`` in: ``lanes`` fp16 codes per beat, paired beat by beat.
    * ``y`` out: ``lanes`` fp16 codes per beat.

    ``latency`` 1: one ``Fp16Add`` (align, add, normalize, round) per lane, no DSP.
    """

    def __init__(self, *, lanes: int):
        _check_lanes(lanes)
        self.lanes = lanes
        super().__init__({
            "residual": In(lane_signature(lanes)),
            "update": In(lane_signature(lanes)),
            "y": Out(lane_signature(lanes)),
        })

    latency = 1

    def elaborate(self, platform):
        m = Module()
        L = self.lanes
        joined = Signal()
        pipe = _Pipeline(m, self.latency, in_valid=joined, out_ready=self.y.ready, name="add")
        _join(m, self.residual, self.update, ready=pipe.in_ready, valid=joined)
        out = Signal(lane_layout(L))
        for c in range(L):
            m.submodules[f"add{c}"] = add = Fp16Add()
            m.d.comb += [add.a.eq(self.residual.payload[c]), add.b.eq(self.update.payload[c])]
            with m.If(pipe.take[0]):
                m.d.sync += out[c].eq(add.y)
        m.d.comb += [self.y.valid.eq(pipe.out_valid), self.y.payload.eq(out)]
        return m

    def model(self, residual, update) -> np.ndarray:
        return fp.fp16_residual_add(residual, update)
