"""The two-bank row buffer of the row units (``RmsNorm``, ``ActQuantizer``).

Both units need a whole row before they can emit its first element (the sum of squares, the
absmax), so both make two passes over a buffered row: pass 1 takes the row in and reduces it,
pass 2 reads it back and scales it. ``RowBuffer`` is the part they share: the memory, pass 1's
row intake and the bank bookkeeping. Two banks let the next row's pass 1 overlap this row's
pass 2.
"""

from dataclasses import dataclass

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import memory_blocks
from trilut.hdl.elementwise.lanes import check_lanes, lane_layout, lane_signature, positive_int

__all__ = ["RowBuffer", "RowBufferJob"]


class RowBuffer(wiring.Component):
    """Two banks of ``words = ceil(max_n / L)`` words of ``lane_layout(L)``: one ``Memory`` of
    ``2 * words`` words (bank ``b`` holds word ``i`` at ``b * words + i``), a write port for
    pass 1 and a read port for pass 2.

    Pass 1 (the front):

    * ``x`` in: the row, ``ceil(n / L)`` beats; each is written to the front bank the cycle it
      is taken, lanes at and beyond ``n`` as +0. ``data`` is that masked beat and ``take`` is
      high in the cycle it is taken (``word``: its word index in the row; ``last``: it is the
      row's last beat), so the owner reduces the row as it arrives.
    * A row's first beat is taken only when the front is idle, no earlier row is waiting to be
      handed on (``pending`` clear, or ``handoff`` this cycle) and a bank is free. The row's
      last beat sets ``pending``; the owner raises ``handoff`` for one cycle when it has handed
      the row's reduction to pass 2. Within a row ``x`` is taken every cycle it is valid.
    * ``n``: elements per row, 1..max_n, constant while any row is in flight.

    Pass 2 (the back): the owner reads the back bank, ``read_word`` with ``read_en`` (the read
    port's enable; ``read_data`` follows on the next cycle), and raises ``release`` with the
    row's last read: the bank is free from the next cycle and the back moves to the other bank.

    A bank is held from its row's first beat taken to its ``release``; the next row's pass 1
    may start while this row's pass 2 runs. No latency of its own: ``take`` and the write are
    in the cycle of the transfer, ``read_data`` one cycle after the read.
    """

    def __init__(self, *, lanes: int, max_n: int):
        check_lanes(lanes)
        positive_int("max_n", max_n, at_most=1 << 20)
        self.lanes = lanes
        self.max_n = max_n
        self.words = -(-max_n // lanes)
        super().__init__({
            "x": In(lane_signature(lanes)),
            "n": In(unsigned(max_n.bit_length())),
            "data": Out(lane_layout(lanes)),
            "take": Out(1),
            "word": Out(range(self.words + 1)),
            "last": Out(1),
            "pending": Out(1),
            "handoff": In(1),
            # Wide enough for every address: a wider word counter is truncated to it, as the
            # memory's address port would.
            "read_word": In(range(2 * self.words)),
            "read_en": In(1),
            "release": In(1),
            "read_data": Out(lane_layout(lanes)),
        })

    def elaborate(self, platform):
        m = Module()
        L, Wd = self.lanes, self.words
        n = self.n
        m.submodules.memory = memory = Memory(shape=lane_layout(L), depth=2 * Wd, init=[])
        wr = memory.write_port()
        rd = memory.read_port()

        used = Signal(range(3))                 # banks holding a row (front start .. release)
        used_inc = Signal()
        m.d.sync += used.eq(used + used_inc - self.release)

        # ---- pass 1: take the row, write it to the front bank ------------------------------
        f_active = Signal()                     # between the first and the last beat of a row
        f_e = Signal(range(self.max_n + L + 1))  # element index of the next beat
        f_word = self.word
        f_bank = Signal()
        with m.If(self.handoff):
            m.d.sync += self.pending.eq(0)      # (a row ending this cycle sets it again)

        start_ok = ~f_active & (~self.pending | self.handoff) & (used < 2)
        take = self.take
        last = self.last
        m.d.comb += [
            last.eq(f_e + L >= n),
            self.x.ready.eq(f_active | start_ok),
            take.eq(self.x.valid & self.x.ready),
            used_inc.eq(take & ~f_active),
            wr.addr.eq(Mux(f_bank, Wd + f_word, f_word)),
            wr.en.eq(take),
            wr.data.eq(self.data),
        ]
        for l in range(L):
            m.d.comb += self.data[l].eq(Mux(f_e + l < n, self.x.payload[l], 0))
        with m.If(take):
            with m.If(last):
                m.d.sync += [f_active.eq(0), self.pending.eq(1), f_e.eq(0), f_word.eq(0),
                             f_bank.eq(~f_bank)]
            with m.Else():
                m.d.sync += [f_active.eq(1), f_e.eq(f_e + L), f_word.eq(f_word + 1)]

        # ---- pass 2: read the back bank ----------------------------------------------------
        b_bank = Signal()
        m.d.comb += [
            rd.addr.eq(Mux(b_bank, Wd + self.read_word, self.read_word)),
            rd.en.eq(self.read_en),
            self.read_data.eq(rd.data),
        ]
        with m.If(self.release):
            m.d.sync += b_bank.eq(~b_bank)
        return m

    # ---- the contract: a building block of the row units, answered for completeness ----------

    def model(self, rows) -> list:
        """What pass 2 reads back of each row of ``rows`` (fp16 codes ``[rows, n]``): the
        row's ``ceil(n / L)`` words of ``L`` lanes, lanes at and beyond ``n`` as +0."""
        rows = [list(r) for r in rows]
        L = self.lanes
        return [[[r[i + l] if i + l < len(r) else 0 for l in range(L)]
                 for i in range(0, len(r), L)] for r in rows]

    def expected_cycles(self, job: "RowBufferJob") -> int:
        """Cycles pass 1 takes a row of ``job.n`` elements, the owner never waiting: one beat
        a cycle, ``ceil(n / L)`` beats (no latency of its own)."""
        positive_int("n", job.n, at_most=self.max_n)
        return -(-job.n // self.lanes)

    def memory_blocks(self) -> dict[str, float]:
        """The two banks, one memory of ``2 * words`` x ``16 L`` bits
        (:func:`trilut.config.memory_blocks`; the kv260 build, 1080 x 256 bits: 12 here, 11 in
        yosys's report, which mixes aspect ratios)."""
        return memory_blocks(16 * self.lanes, 2 * self.words)


@dataclass(frozen=True)
class RowBufferJob:
    """A row of ``n`` elements taken by pass 1 (:meth:`RowBuffer.expected_cycles`)."""

    n: int
