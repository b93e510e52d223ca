"""A tiny stream design and its cocotb testbench, proving the simulation infrastructure.

:class:`StreamFifoStage` is a buffered FIFO, optionally followed by a registered pipeline
stage, on ``amaranth.lib.stream`` with a wide payload. The stage's ``ready`` depends
combinationally on the downstream ``ready`` (``ready = o.ready | ~o.valid``), so a driver that
sampled at the wrong moment would drop or duplicate beats.

The cocotb tests read their settings from the environment (``run_cocotb(env=...)``, see
:meth:`StreamFifoStage.testbench_env`): ``TB_LATENCY`` (the design's, checked exactly),
``TB_BEATS`` (beats per test), ``TB_SEED``, ``TB_IDLE`` / ``TB_STALL`` (probability of an idle
cycle on the source / of backpressure on the sink) and ``TB_EXPECT_FAILURE=1``, which
enables :func:`scoreboard_catches_a_dropped_beat`, a test that must fail.
:class:`ImpatientSource` breaks the stream rules on purpose; with ``TB_PROTOCOL_VIOLATION=1``,
:func:`sink_catches_a_protocol_violation` checks that the sink notices.
"""

import itertools
import os
import random
import time

import cocotb
from cocotb.triggers import ClockCycles
from amaranth.hdl import Module
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .streams import (CycleCounter, StreamProtocolError, StreamSink, StreamSource,
                      random_pause, reset, start_clock)

__all__ = ["ImpatientSource", "StreamFifoStage"]


class StreamFifoStage(wiring.Component):
    """``SyncFIFOBuffered``, optionally followed by a registered stage; ``width``-bit payloads.

    Streams: ``i`` (in) and ``o`` (out), ``amaranth.lib.stream`` rules; one beat per cycle.
    :attr:`latency`, from the edge that transfers a beat on ``i`` to the earliest edge that can
    transfer it on ``o`` with the FIFO empty, is 2 cycles through ``SyncFIFOBuffered``
    (storage, then its output register) plus 1 for the output stage (checked against
    Amaranth's simulator). Without the stage every output (``i.ready``, ``o.valid``,
    ``o.payload``) comes straight from a register; with it, ``i.ready`` depends
    combinationally on ``o.ready``.
    """

    def __init__(self, *, width: int = 300, depth: int = 4, output_stage: bool = True):
        if not (isinstance(width, int) and width > 0):
            raise ValueError(f"width must be a positive integer, not {width!r}")
        if not (isinstance(depth, int) and depth > 0):
            raise ValueError(f"depth must be a positive integer, not {depth!r}")
        self.width = width
        self.depth = depth
        self.output_stage = bool(output_stage)
        super().__init__({
            "i": In(stream.Signature(width)),
            "o": Out(stream.Signature(width)),
        })

    @property
    def latency(self) -> int:
        return 2 + self.output_stage

    def elaborate(self, platform):
        m = Module()
        m.submodules.fifo = buffer = fifo.SyncFIFOBuffered(width=self.width, depth=self.depth)
        wiring.connect(m, wiring.flipped(self.i), buffer.w_stream)
        if not self.output_stage:
            wiring.connect(m, buffer.r_stream, wiring.flipped(self.o))
            return m

        # A register stage that can accept a new beat whenever it is empty or being emptied.
        head = buffer.r_stream
        m.d.comb += head.ready.eq(self.o.ready | ~self.o.valid)
        with m.If(head.ready):
            m.d.sync += [
                self.o.valid.eq(head.valid),
                self.o.payload.eq(head.payload),
            ]
        return m

    def model(self, beats):
        """What comes out for a sequence of beats in: the same beats, in order."""
        return list(beats)

    def testbench_env(self, **settings) -> dict:
        """Environment for the cocotb tests below: this design's latency plus ``settings``."""
        return {"TB_LATENCY": str(self.latency),
                **{f"TB_{key.upper()}": str(value) for key, value in settings.items()}}


class ImpatientSource(wiring.Component):
    """A deliberately broken stream source, to prove :class:`StreamSink` checks the rules.

    ``o.payload`` counts cycles and ``o.valid`` is high on every other cycle, whatever
    ``o.ready`` says: a stalled beat changes and disappears.
    """

    o: Out(stream.Signature(16))

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.o.payload.eq(self.o.payload + 1)
        m.d.comb += self.o.valid.eq(self.o.payload[0])
        return m


class TB:
    """Clock, reset, a source on ``i``, a sink on ``o``, and the settings from the environment."""

    def __init__(self, dut):
        env = os.environ
        self.dut = dut
        self.beats = int(env.get("TB_BEATS", "1000"))
        self.seed = int(env.get("TB_SEED", "1"))
        self.idle = float(env.get("TB_IDLE", "0.3"))
        self.stall = float(env.get("TB_STALL", "0.3"))
        self.latency = int(env["TB_LATENCY"])
        self.width = len(dut.i__payload)
        self.rng = random.Random(self.seed)
        # Generous: every beat may wait out a long run of stalls.
        self.timeout_cycles = 100 * self.beats + 100

    async def start(self, *, stalls: bool = True):
        start_clock(self.dut.clk)
        await reset(self.dut.clk, self.dut.rst)
        idle = random_pause(self.seed, self.idle) if stalls and self.idle else None
        stall = random_pause(self.seed + 1, self.stall) if stalls and self.stall else None
        self.source = StreamSource(self.dut, "i", self.dut.clk, pause=idle)
        self.sink = StreamSink(self.dut, "o", self.dut.clk, pause=stall)

    def stimulus(self, count: int) -> list:
        # Edge values first: the low and high bits of a wide bus are where packing bugs show.
        width = self.width
        edges = [0, (1 << width) - 1, 1, 1 << (width - 1), int("10" * (width // 2), 2)]
        return (edges + [self.rng.getrandbits(width) for _ in range(count)])[:count]


@cocotb.test()
async def every_beat_once_in_order_under_stalls(dut):
    """Random idle and backpressure; every beat must arrive exactly once, in order."""
    tb = TB(dut)
    await tb.start()
    sent = tb.stimulus(tb.beats)
    source_done = cocotb.start_soon(tb.source.send_all(sent, timeout_cycles=tb.timeout_cycles))
    received = await tb.sink.recv_n(tb.beats, timeout_cycles=tb.timeout_cycles)
    await source_done
    # Nothing duplicated after the last beat: let the pipeline drain, then count again.
    await ClockCycles(dut.clk, 4 * tb.latency + 10)
    assert len(tb.sink.received) == tb.beats, f"{len(tb.sink.received) - tb.beats} extra beats"
    assert received == sent, _first_mismatch(sent, received)
    # Each transfer on its own edge, and the stalls really happened.
    for cycles in (tb.source.handshake_cycles, tb.sink.handshake_cycles):
        assert all(a < b for a, b in zip(cycles, cycles[1:]))
    if tb.idle or tb.stall:
        busy = tb.sink.handshake_cycles[-1] - tb.source.handshake_cycles[0]
        assert busy > tb.beats + tb.latency, "no stall happened: the pause generators are idle"


@cocotb.test()
async def full_throughput_and_latency(dut):
    """No stalls: one beat per cycle after the design's latency; reports simulation speed."""
    tb = TB(dut)
    await tb.start(stalls=False)
    sent = tb.stimulus(tb.beats)
    counter = CycleCounter(dut.clk)
    wall = time.perf_counter()
    counter.mark("start")
    for beat in sent:
        tb.source.send_nowait(beat)
    received = await tb.sink.recv_n(tb.beats, timeout_cycles=tb.timeout_cycles)
    counter.mark("done")
    wall = time.perf_counter() - wall
    assert received == sent, _first_mismatch(sent, received)
    latency = tb.sink.handshake_cycles[0] - tb.source.handshake_cycles[0]
    assert latency == tb.latency, f"latency {latency} cycles, expected {tb.latency}"
    gaps = {b - a for a, b in zip(tb.sink.handshake_cycles, tb.sink.handshake_cycles[1:])}
    assert gaps <= {1}, f"throughput gaps {sorted(gaps)}, expected one beat per cycle"
    cycles = counter.between("start", "done")
    dut._log.info("%d beats of %d bits in %d cycles: %.0f cycles/s", tb.beats, tb.width,
                  cycles, cycles / wall)


@cocotb.test(skip=os.environ.get("TB_EXPECT_FAILURE") != "1")
async def scoreboard_catches_a_dropped_beat(dut):
    """Must fail: the scoreboard expects one beat the test never sends (TB_EXPECT_FAILURE=1)."""
    tb = TB(dut)
    await tb.start()
    sent = tb.stimulus(tb.beats)
    await tb.source.send_all(sent[:-1], timeout_cycles=tb.timeout_cycles)
    received = await tb.sink.recv_n(tb.beats - 1, timeout_cycles=tb.timeout_cycles)
    assert received == sent, _first_mismatch(sent, received)


@cocotb.test(skip=os.environ.get("TB_PROTOCOL_VIOLATION") != "1",
             expect_error=StreamProtocolError)
async def sink_catches_a_protocol_violation(dut):
    """Run on :class:`ImpatientSource` (TB_PROTOCOL_VIOLATION=1): the sink must raise."""
    start_clock(dut.clk)
    await reset(dut.clk, dut.rst)
    # Stall every cycle but one in four; the first stalled beat breaks the rules.
    sink = StreamSink(dut, "o", dut.clk, pause=itertools.cycle([True, True, True, False]))
    await sink.recv_n(10, timeout_cycles=100)


def _first_mismatch(sent: list, received: list) -> str:
    for index, (want, got) in enumerate(zip(sent, received)):
        if want != got:
            return f"beat {index}: sent {want:#x}, received {got:#x}"
    return f"sent {len(sent)} beats, received {len(received)}"
