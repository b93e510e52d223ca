"""The per-row absmax int8 activation quantizer feeding the TLMM engine (``ActQuantizer``).

The quantizer needs a whole row before it can emit its first element (the absmax), so it
makes two passes over the row, kept in the two-bank ``RowBuffer`` (``row_buffer.py``): the
first takes the row in and reduces it, the second reads it back and scales it, and the
next row's first pass overlaps this row's second.

Lane convention (``lanes.py``): a row of ``n`` elements is ``ceil(n / L)`` beats of
``lane_layout(L)``; lanes at and beyond ``n`` in the last beat are ignored. ``n``
(1 <= n <= max_n) and ``tiles`` are shape inputs held constant while any row is in flight.

Numerics are those of ``trilut.models.fp16`` bit for bit; ``model()`` calls it.
docs/row_units.md gives the protocol, latency, buffering and resources.
"""

import math
from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import EngineConfig, memory_blocks, sum_memory
from trilut.hdl.elementwise.lanes import check_lanes, lane_signature, positive_int
from trilut.hdl.elementwise.row_buffer import RowBuffer
from trilut.models import fp16 as fp
from trilut.models import numerics

__all__ = ["ActQuantizer", "ActQuantJob", "quant_reciprocal_table", "TILES_WIDTH"]

_FP32 = fp.FP32
_FP32_BIAS = _FP32.bias                     # 127
_FP16_BIAS = fp.FP16.bias                   # 15

#: Width of ``ActQuantizer.tiles``: up to 255 output tiles per matmul (kv260: a 4096-column
#: tile, so 255 tiles cover a 1M-wide output).
TILES_WIDTH = 8


def quant_reciprocal_table() -> np.ndarray:
    """The 1024-entry ROM behind ``s = round32(127 / A)`` (``models.fp16`` quantize_int8):
    entry ``m`` is the fp32 code of ``round32(127 / (1 + m/1024))``. For ``A = (1 + m/1024) *
    2**E``, ``s`` is the entry with ``E`` subtracted from its exponent, exactly (the rounding
    does not depend on a power of two, and every ``s`` of a normal fp16 ``A`` is a normal
    fp32 number)."""
    mant = np.arange(1 << fp.FP16.mantissa_bits)
    a = 1.0 + mant / (1 << fp.FP16.mantissa_bits)
    return _FP32.from_float(numerics.ACT_MAX / a).astype(np.int64)


@dataclass(frozen=True)
class ActQuantJob:
    """``rows`` rows of ``n`` elements, each sent ``tiles`` times (``EngineConfig.output_tiles``
    of the matmul's width), through :class:`ActQuantizer`, streams never stalling."""

    n: int
    rows: int
    tiles: int

    def __post_init__(self):
        positive_int("n", self.n)
        positive_int("rows", self.rows)
        positive_int("tiles", self.tiles, at_most=(1 << TILES_WIDTH) - 1)


class ActQuantizer(wiring.Component):
    """Per-row absmax int8 quantization feeding the TLMM engine's ``acts`` stream.

    ``(codes, A) = models.fp16.fp16_quantize_int8(x)``; the ``acts`` stream is
    ``numerics.tlmm_act_beats(codes, ...)``: per row, ``tiles`` times, the codes in blocks of
    ``G*T`` int8, K zero-padded to a multiple of ``G*T``.

    Streams:

    * ``x`` in: the row, ``ceil(n/L)`` beats of ``L`` fp16 codes.
    * ``acts`` out: ``tiles * ceil(n / (G*T))`` beats per row of ``G*T`` signed int8
      (element 0 lowest), exactly what ``TlmmEngine.acts`` takes.
    * ``absmax`` out: one beat per row, A as an fp16 code (+0 for an all-zero row); sent when
      the row's second pass starts. It must be taken before the next row's pass 2 can start.
    * ``n`` (1..max_n) and ``tiles`` (1..255): constant while any row is in flight.

    Passes: (1) the row is buffered at one beat per cycle while a lane-max tree keeps the
    largest magnitude (an integer compare of the 15 magnitude bits, subnormals as zero);
    (2) ``s`` comes from ``quant_reciprocal_table`` (one BRAM read, an exponent subtract),
    then the row is read ``tiles`` times at one word per cycle: ``x*s`` exact (11 x 24 bits),
    ``rint`` half to even, clamp, into a gearbox that packs L codes per cycle into G*T-code
    beats. Two banks: the next row's pass 1 overlaps this row's pass 2.
    ``expected_cycles`` gives the exact count without stalls.
    """

    def __init__(self, cfg: EngineConfig, *, lanes: int, max_n: int):
        if not isinstance(cfg, EngineConfig):
            raise TypeError(f"cfg must be an EngineConfig, not {cfg!r}")
        check_lanes(lanes)
        positive_int("max_n", max_n, at_most=1 << 20)
        self.cfg = cfg
        self.lanes = lanes
        self.max_n = max_n
        self.block = cfg.block_k
        self.words = -(-max_n // lanes)
        self.n_width = max_n.bit_length()
        self.row_buffer = RowBuffer(lanes=lanes, max_n=max_n)
        super().__init__({
            "x": In(lane_signature(lanes)),
            "acts": Out(stream.Signature(data.ArrayLayout(signed(cfg.act_bits), cfg.block_k))),
            "absmax": Out(stream.Signature(unsigned(16))),
            "n": In(unsigned(self.n_width)),
            "tiles": In(unsigned(TILES_WIDTH)),
        })

    def elaborate(self, platform):
        m = Module()
        L, B, Wd = self.lanes, self.block, self.words
        g = math.gcd(L, B)
        slots = B + L - g                       # gearbox capacity, in codes
        e_shape = range(self.max_n + B + 2 * L + 1)
        n = self.n
        m.submodules.row_buffer = row = self.row_buffer
        wiring.connect(m, wiring.flipped(self.x), row.x)
        m.d.comb += row.n.eq(n)
        m.submodules.reciprocal = recip = Memory(
            shape=unsigned(31), depth=1 << fp.FP16.mantissa_bits,
            init=[int(v) for v in quant_reciprocal_table()])
        recip_rd = recip.read_port()

        # ---- pass 1: buffer and absmax -----------------------------------------------------
        take = row.take
        mags = [Signal(15, name=f"mag{l}") for l in range(L)]
        mag_valid, mag_first = Signal(), Signal()
        absmax = Signal(15)

        handoff = Signal()
        m.d.comb += row.handoff.eq(handoff)
        for l in range(L):
            x = row.data[l]
            with m.If(take):
                m.d.sync += mags[l].eq(Mux(x[10:15] == 0, 0, x[:15]))   # subnormals read 0
        m.d.sync += [mag_valid.eq(take), mag_first.eq(row.word == 0)]
        level = list(mags)
        while len(level) > 1:
            level = [Mux(level[i] > level[i + 1], level[i], level[i + 1])
                     if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
        lane_max = Signal(15)
        m.d.comb += lane_max.eq(level[0])
        with m.If(mag_valid):
            m.d.sync += absmax.eq(Mux(mag_first | (lane_max > absmax), lane_max, absmax))

        # ---- handoff: absmax out, s from the reciprocal ROM ---------------------------------
        a_valid = Signal()
        r_setup = Signal()                       # the cycle the ROM word arrives
        r_active = Signal()
        a_reg = Signal(15)
        m.d.comb += [
            handoff.eq(row.pending & ~mag_valid & ~r_setup & ~r_active &
                       (~a_valid | self.absmax.ready)),
            recip_rd.addr.eq(absmax[:10]),
            self.absmax.valid.eq(a_valid),
            self.absmax.payload.eq(a_reg),
        ]
        with m.If(self.absmax.ready):
            m.d.sync += a_valid.eq(0)
        with m.If(handoff):
            m.d.sync += [a_valid.eq(1), a_reg.eq(absmax), r_setup.eq(1)]

        # s = rom * 2**-(E_A): s_exp = rom_exp - (biased_A - 15). A = 0 gives s = 0.
        s_sig = Signal(24)
        s_exp = Signal(9)
        s_zero = Signal()
        with m.If(r_setup):
            m.d.sync += [r_setup.eq(0), r_active.eq(1),
                         s_sig.eq(Cat(recip_rd.data[:23], 1)),
                         s_exp.eq(recip_rd.data[23:31] - a_reg[10:15] + _FP16_BIAS),
                         s_zero.eq(a_reg[10:15] == 0)]

        # ---- pass 2: read the row `tiles` times ---------------------------------------------
        r_e = Signal(e_shape)                    # first element of the next word
        r_mod = Signal(range(B))                 # r_e mod B
        r_word = Signal(range(Wd + self.max_n + 1))
        r_rep = Signal(TILES_WIDTH)
        # The rep ends with the word that covers the last G*T block: e' rounded down to a
        # multiple of B reaches n.
        next_e = r_e + L
        next_mod = Signal(range(2 * B))
        m.d.comb += next_mod.eq(r_mod + (L % B))
        wrapped = Signal(range(B))
        m.d.comb += wrapped.eq(Mux(next_mod >= B, next_mod - B, next_mod))
        word_last = (next_e - wrapped) >= n

        s1_valid, s2_valid, s3_valid = Signal(), Signal(), Signal()
        s1_mask = Signal(L)
        s1_sig, s1_exp, s1_zero = Signal(24), Signal(9), Signal()
        window = Signal(8 * slots)
        pending = Signal(range(slots + 1))
        beat_start = Signal(e_shape)             # first element of the next beat
        o_valid = Signal()
        o_payload = Signal(8 * B)
        o_free = ~o_valid | self.acts.ready
        emit = (pending >= B) & o_free
        beat_last = beat_start + B >= n
        after_emit = Signal(range(slots + 1))
        m.d.comb += after_emit.eq(Mux(emit, Mux(beat_last, 0, pending - B), pending))
        advance = ~s3_valid | (after_emit < B)

        issue = Signal()
        m.d.comb += [
            issue.eq(r_active & advance),
            row.read_word.eq(r_word),
            row.read_en.eq(advance),
            row.release.eq(issue & word_last & (r_rep + 1 >= self.tiles)),
        ]
        with m.If(issue):
            with m.If(word_last):
                m.d.sync += [r_e.eq(0), r_mod.eq(0), r_word.eq(0)]
                with m.If(r_rep + 1 >= self.tiles):
                    m.d.sync += [r_active.eq(0), r_rep.eq(0)]
                with m.Else():
                    m.d.sync += r_rep.eq(r_rep + 1)
            with m.Else():
                m.d.sync += [r_e.eq(next_e), r_mod.eq(wrapped), r_word.eq(r_word + 1)]

        with m.If(advance):
            m.d.sync += [s1_valid.eq(issue), s2_valid.eq(s1_valid), s3_valid.eq(s2_valid),
                         s1_mask.eq(Cat(r_e + l < n for l in range(L))),
                         s1_sig.eq(s_sig), s1_exp.eq(s_exp), s1_zero.eq(s_zero)]
        s3_codes = Signal(8 * L)
        for l in range(L):
            x = row.read_data[l]
            ex = x[10:15]
            # S1 -> S2: x*s exact (one DSP48E2: 11 x 24 bits) and its binary point.
            prod = Signal(35, name=f"xs{l}")
            shift = Signal(signed(10), name=f"xs_shift{l}")
            neg, zero = Signal(name=f"xs_neg{l}"), Signal(name=f"xs_zero{l}")
            with m.If(advance):
                # x*s = prod * 2**-shift, shift = 175 - ex - s_exp (25 + 150 fraction bits).
                m.d.sync += [prod.eq(Cat(x[:10], 1) * s1_sig),
                             shift.eq(10 + 15 + 23 + _FP32_BIAS - ex - s1_exp),
                             neg.eq(x[15]), zero.eq((ex == 0) | s1_zero | ~s1_mask[l])]
            # S2 -> S3: rint half to even, clamp. prod is in [2**33, 2**35): a shift of 26 or
            # less gives |x*s| >= 128 (clamped), 36 or more gives < 0.5 (zero).
            aligned = Signal(43, name=f"xs_aligned{l}")
            m.d.comb += aligned.eq(Cat(Const(0, 8), prod) >> (shift - 27)[:4])
            integer = aligned[35:43]
            guard = aligned[34]
            sticky = aligned[:34].any()
            mag = Signal(9, name=f"q_mag{l}")
            m.d.comb += mag.eq(integer + (guard & (sticky | integer[0])))
            saturate = (shift <= 26) | (mag > Mux(neg, 128, 127))
            limit = Mux(neg, 128, 127)
            q = Signal(signed(8), name=f"q{l}")
            m.d.comb += q.eq(Mux(zero | (shift >= 36), 0,
                                 Mux(neg, -Mux(saturate, limit, mag), Mux(saturate, limit, mag))))
            with m.If(advance):
                m.d.sync += s3_codes[8 * l:8 * l + 8].eq(q)

        # ---- gearbox: L codes in per word, G*T codes out per beat ---------------------------
        # The unsent codes are the top `pending` slots of `window`; a word shifts in at the top.
        # A beat starts at slot slots - pending; pending is a multiple of gcd(L, B).
        accept = s3_valid & advance
        with m.If(emit):
            with m.Switch(pending):
                for p in range(B, slots + 1, g):
                    with m.Case(p):
                        lo = slots - p
                        m.d.sync += o_payload.eq(window[8 * lo:8 * (lo + B)])
            m.d.sync += [o_valid.eq(1), beat_start.eq(Mux(beat_last, 0, beat_start + B))]
        with m.Elif(self.acts.ready):
            m.d.sync += o_valid.eq(0)
        with m.If(accept):
            m.d.sync += [window.eq(Cat(window[8 * L:], s3_codes)), pending.eq(after_emit + L)]
        with m.Else():
            m.d.sync += pending.eq(after_emit)
        m.d.comb += [self.acts.valid.eq(o_valid), self.acts.payload.as_value().eq(o_payload)]
        return m

    # ---- what it computes, how long it takes -------------------------------------------------

    def model(self, x, n_out: int) -> tuple[list[int], np.ndarray]:
        """fp16 codes ``x[rows, n]`` -> ``(acts beats, absmax codes[rows])`` for a matmul with
        ``n_out`` output columns: ``numerics.tlmm_act_beats`` of ``fp16_quantize_int8``."""
        codes, absmax = fp.fp16_quantize_int8(np.asarray(x, dtype=np.uint16))
        cfg = self.cfg
        beats = numerics.tlmm_act_beats(codes, cfg.code, cfg.tables_per_step,
                                        cfg.columns_per_cycle, cfg.accumulator_depth, n_out)
        return beats, absmax[:, 0]

    def memory_blocks(self) -> dict[str, float]:
        """The row buffer's and the reciprocal ROM (1024 x 31 bits, one RAMB36;
        docs/row_units.md: 12 BRAM36 in all at kv260)."""
        return sum_memory(self.row_buffer.memory_blocks(),
                          memory_blocks(31, 1 << fp.FP16.mantissa_bits))

    def expected_cycles(self, job: ActQuantJob) -> int:
        """Cycles from the first ``x`` beat taken to the last ``acts`` beat taken, inclusive,
        for ``job.rows`` rows of ``job.n`` elements sent ``job.tiles`` times, streams never
        stalling.

        A replay of the control alone (no data), cycle by cycle: with ``G*T >= L`` the
        gearbox never fills and the row's words stream at one per cycle; with ``G*T < L`` it
        is bound by one ``acts`` beat per cycle and stalls the read pipeline.
        """
        n, rows, tiles = job.n, job.rows, job.tiles
        positive_int("n", n, at_most=self.max_n)
        L, B = self.lanes, self.block
        beats_in = -(-n // L)
        k_beats = -(-n // B)
        words = tiles * -(-k_beats * B // L)      # words read per row, all reps
        f_rows = f_beat = 0
        f_active = f_pending = mag_valid = r_setup = r_active = False
        used = issued = pending = beat_in_rep = beats_out = 0
        pipe = [False, False, False]              # S1, S2, S3 valid
        cycle = last_out = 0
        while beats_out < rows * tiles * k_beats:
            handoff = f_pending and not mag_valid and not r_setup and not r_active
            take = f_active or (f_rows < rows and (not f_pending or handoff) and used < 2)
            emit = pending >= B
            after = (0 if beat_in_rep == k_beats - 1 else pending - B) if emit else pending
            advance = not pipe[2] or after < B
            issue = r_active and advance
            row_read = issue and issued == words - 1
            # -- the clock edge --
            used += (take and not f_active) - row_read
            if handoff:
                f_pending = False
            if take:
                f_beat += 1
                f_active = f_beat < beats_in
                if not f_active:
                    f_beat, f_rows, f_pending = 0, f_rows + 1, True
            mag_valid = take
            r_active = (r_active or r_setup) and not row_read
            r_setup = handoff
            issued = 0 if row_read else issued + issue
            if emit:
                beats_out += 1
                beat_in_rep = 0 if beat_in_rep == k_beats - 1 else beat_in_rep + 1
                last_out = cycle + 1
            pending = after + L if pipe[2] and advance else after
            if advance:
                pipe = [issue, pipe[0], pipe[1]]
            cycle += 1
        return last_out + 1
