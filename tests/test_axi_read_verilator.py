# amaranth: UnusedElaboratable=no
"""The memory side: AxiReadMaster reading DdrModel, on Verilator (cocotb) and in amaranth.sim.

The Verilator runs (never skipped) build ``DdrReadHarness`` once per configuration (cached by
the hash of its Verilog) and run every phase in one simulator launch of the generic testbench
(``sim/stream_testbench.py``, through ``run_stream_on``): a random 16 KiB image preloaded
through the backdoor, then commands of 1, 255, 256, 257 and 1000 words, length 0, commands
that cross 4 KiB boundaries (one in the upper DDR window at ``0x8_0000_0000``), many short
commands back to back, under random idle on ``cmd`` and backpressure on ``data``; then the
short commands and long reads without stalls, where the measured cycles must equal
``AxiReadMaster.expected_cycles`` (whenever ``hides_latency`` holds; never fewer otherwise)
and the sustained rate must reach the DDR model's configured bandwidth. Every word must
arrive once, in order, bit for bit, the AR channel (``ar_monitor``) must carry exactly the
bursts of ``AxiReadMaster.bursts`` (AXI4 rules checked on each), nothing may follow a phase's
last word, and the master must be ``idle`` after every phase.

The amaranth.sim tests are the fast tier: a small harness under random stalls, the DDR
model's latency, ID echo and rule flags driven directly, the burst split and the parameter
checks.
"""

import math
import random

import pytest
from amaranth.sim import Simulator

from trilut.config import AXI_ADDR_WIDTH, DdrSimConfig
from trilut.hdl.memory.axi import AxiReadMaster, PAGE_BYTES, ReadJob, split_bursts
from trilut.sim.ddr_model import DdrModel, DdrReadHarness
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

pytestmark = pytest.mark.rtl

# Words: 16 KiB of 128-bit words, 4 pages of 4 KiB. Longer reads wrap around (the DDR model
# aliases addresses modulo its depth; ``Aliased`` below is the same rule). Amaranth writes a
# memory's initial contents into the Verilog, and 4096 words made a 1.3 MB C++ file and a
# 35 s build; 1024 words build in about a quarter of that.
DEPTH = 1024
WORD = 16                        # bytes per 128-bit word
UPPER_DDR = 0x8_0000_0000        # the KV260's upper 2 GB DDR window: needs a 40-bit address

CONFIGS = {
    # The two settings the brief asks for: full rate at latency 20, half rate at latency 40.
    "full-rate-latency20": dict(latency=20, beats_per_window=1, window=1, max_outstanding=4),
    # 3 bursts in flight: 2 would stall on the short bursts that 4 KiB boundaries cut off
    # (hides_latency says so, and the simulation agreed: 0.493 beats/cycle instead of 0.5).
    "half-rate-latency40": dict(latency=40, beats_per_window=1, window=2, max_outstanding=3),
    # Short bursts: many outstanding bursts, a small credit buffer, a fractional rate.
    "3of4-rate-16-beat-bursts": dict(latency=24, beats_per_window=3, window=4, max_burst=16,
                                     max_outstanding=4, buffer_depth=64, ar_queue_depth=4),
}


def read_harness(*, depth: int, data_width: int, latency: int, beats_per_window: int = 1,
                 window: int = 1, **master) -> DdrReadHarness:
    """A ``DdrReadHarness`` with the DDR's timing as a board's ``[ddr_sim]`` gives it."""
    ddr = DdrSimConfig(latency=latency, beats_per_window=beats_per_window, window=window)
    return DdrReadHarness(depth=depth, data_width=data_width, addr_width=AXI_ADDR_WIDTH,
                          ddr=ddr, **master)


class Aliased:
    """The memory as the DDR model sees it: word address modulo its depth."""

    def __init__(self, image):
        self.image = image

    def __getitem__(self, word):
        return self.image[word % len(self.image)]


def _phases(rng: random.Random) -> list[dict]:
    mixed = [
        (0, 1),
        (300 * WORD, 255),                      # unaligned: split at the 4 KiB boundaries
        (512 * WORD, 256),                      # page aligned: one full 256-beat burst
        (700 * WORD + 5 * WORD, 257),
        (24 * WORD, 1000),
        (77 * WORD, 0),                         # length 0 reads nothing
        (UPPER_DDR + 0xFC0, 12),                # crosses 4 KiB: 4 beats, then 8
        (3 * WORD + 7, 3),                      # low address bits below a word are ignored
    ]
    short = [(rng.randrange(DEPTH) * WORD, rng.randint(1, 40)) for _ in range(30)]
    return [
        dict(name="mixed-lengths-stalls", commands=mixed, stall=0.3,
             stream_stalls={"data": 0.4}),
        # Commands always offered, data backpressured.
        dict(name="back-to-back-short-data-stall", commands=short, stall=0.2,
             stream_stalls={"cmd": 0.0}),
        # The same commands truly back to back: one AR a cycle, whatever the lengths.
        dict(name="back-to-back-short", commands=short),
        dict(name="long-read", commands=[(0, 2048)]),
        dict(name="long-reads-unaligned",
             commands=[(UPPER_DDR + (i * 509 + 3) * WORD, 400) for i in range(6)]),
    ]


def _ar_beats(master: AxiReadMaster, commands) -> list[int]:
    """The ``ar_monitor`` beats (``addr``, then ``len`` = beats - 1) of ``commands``."""
    return [addr | (beats - 1) << master.addr_width
            for a, n in commands for addr, beats in master.bursts(a, n)]


def axi_read_run(harness: DdrReadHarness, seed: int = 7) -> tuple[StreamRun, list[dict]]:
    """The Verilator run for one harness: a random image preloaded through the backdoor, then
    one phase per command list of :func:`_phases`; each phase settles until the master is
    idle and checks that it is."""
    master, ddr = harness.master, harness.ddr
    rng = random.Random(seed)
    image = [rng.getrandbits(master.data_width) for _ in range(DEPTH)]
    specs = _phases(rng)
    for spec in specs:
        spec["image"] = image
    phases = []
    for number, spec in enumerate(specs):
        commands = spec["commands"]
        job = ReadJob(commands, ddr.ddr)
        exact = "stall" not in spec and master.hides_latency(job)
        phases.append(StreamPhase(
            name=spec["name"], stall=spec.get("stall", 0.0),
            stream_stalls=spec.get("stream_stalls", {}), seed=10 * number + 1,
            inputs={"cmd": [addr | length << master.addr_width for addr, length in commands]},
            expected={"data": master.model(Aliased(image), commands),
                      "ar_monitor": _ar_beats(master, commands)},
            # Exact when the bursts in flight cover the latency; else a lower bound only.
            expected_cycles=master.expected_cycles(job) if exact else None,
            # Long enough for a duplicated beat or a stray burst to surface, then idle.
            settle_cycles=3 * ddr.latency + 20, flags={"idle": 1}))
    run = StreamRun(phases=phases, memory=dict(enumerate(image)),
                    clean_flags=("violations", "r_stalled", "error"))
    return run, specs


@pytest.mark.parametrize("name", CONFIGS)
def test_axi_read_master_against_ddr_model_on_verilator(name, tmp_path):
    harness = read_harness(depth=DEPTH, data_width=8 * WORD, **CONFIGS[name])
    master, ddr = harness.master, harness.ddr
    run, specs = axi_read_run(harness)
    # The testbench checks every word and every AR beat bit for bit, in order, the silence
    # after each phase, ``idle``, the DDR's rule flags, R never stalled, no error response,
    # and the stall-free cycles of the phases whose ``expected_cycles`` it was given.
    results = run_stream_on(harness, run, name="axi_read_harness", run_dir=tmp_path)
    rate = ddr.beats_per_cycle
    for spec, phase, seen in zip(specs, run.phases, results, strict=True):
        commands = spec["commands"]
        assert seen.outputs["data"] == master.model(Aliased(spec["image"]), commands), \
            phase.name
        mask = (1 << master.addr_width) - 1
        bursts = [(beat & mask, (beat >> master.addr_width) + 1)
                  for beat in seen.outputs["ar_monitor"]]
        assert bursts == [b for a, n in commands for b in master.bursts(a, n)], phase.name
        for addr, beats in bursts:
            assert 1 <= beats <= min(256, master.max_burst)
            assert addr // PAGE_BYTES == (addr + beats * WORD - 1) // PAGE_BYTES, hex(addr)
        job = ReadJob(commands, ddr.ddr)
        expected = master.expected_cycles(job)
        if not phase.stalls and phase.name.startswith("long"):
            # No backpressure, and the bursts in flight cover the latency: the memory's
            # bandwidth is the only limit, and the performance model is cycle-exact.
            assert master.hides_latency(job)
            data = seen.handshakes["data"]
            measured = (len(data) - 1) / (data[-1] - data[0])
            print(f"{name} {phase.name}: {len(data)} words, {seen.cycles} cycles "
                  f"(expected {expected}), sustained {measured:.4f} beats/cycle "
                  f"vs configured {rate:.4f}")
            assert measured >= 0.98 * rate
            assert phase.expected_cycles == expected
            assert seen.cycles == expected
            # The first word: 2 cycles to the AR, the latency, 2 through the buffer.
            assert data[0] - seen.handshakes["cmd"][0] == 4 + ddr.latency
        elif phase.expected_cycles is not None:
            assert seen.cycles == phase.expected_cycles == expected, phase.name
        else:
            assert seen.cycles >= expected, phase.name


# ---- fast tier: amaranth.sim ----------------------------------------------------------------

def _simulate_harness(harness, image, commands, *, seed, p_cmd=0.7, p_ready=0.6,
                      max_cycles=20000):
    rng = random.Random(seed)
    expected = harness.master.model(Aliased(image), commands)
    got, bursts, flags = [], [], {}
    cycles = {}

    async def testbench(ctx):
        for i, word in enumerate(image):
            ctx.set(harness.load.valid, 1)
            ctx.set(harness.load.payload.word_addr, i)
            ctx.set(harness.load.payload.data, word)
            await ctx.tick()
        ctx.set(harness.load.valid, 0)
        pending, offered = list(commands), False
        for cycle in range(max_cycles):
            if not offered and pending and rng.random() < p_cmd:
                offered = True
                ctx.set(harness.cmd.payload.addr, pending[0][0])
                ctx.set(harness.cmd.payload.length, pending[0][1])
            ctx.set(harness.cmd.valid, offered)
            ready = rng.random() < p_ready
            ctx.set(harness.data.ready, ready)
            _, _, cmd_ready, valid, payload, ar_valid, ar_addr, ar_len = await ctx.tick().sample(
                harness.cmd.ready, harness.data.valid, harness.data.payload,
                harness.ar_monitor.valid, harness.ar_monitor.payload.addr,
                harness.ar_monitor.payload.len)
            if offered and cmd_ready:
                pending.pop(0)
                offered = False
                cycles.setdefault("first_cmd", cycle)
            if ready and valid:
                got.append(payload)
                cycles["last_word"] = cycle
            if ar_valid:
                bursts.append((ar_addr, ar_len + 1))
            if not pending and len(got) == len(expected):
                break
        await ctx.tick().repeat(8)
        for flag in ("violations", "r_stalled", "error", "idle"):
            flags[flag] = int(ctx.get(getattr(harness, flag).as_value()
                                      if flag == "violations" else getattr(harness, flag)))

    sim = Simulator(harness)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    flags["cycles"] = cycles["last_word"] - cycles["first_cmd"] + 1 if got else 0
    return got, expected, bursts, flags


@pytest.mark.parametrize("data_width, max_burst", [(128, 16), (256, 256), (64, 64)])
def test_small_harness_under_random_stalls_amaranth_sim(data_width, max_burst):
    # 256-bit words: a 4 KiB page is 128 beats, so the page rule, not max_burst, cuts bursts.
    harness = read_harness(depth=512, data_width=data_width, latency=6, beats_per_window=3,
                           window=4, max_burst=max_burst, max_outstanding=3,
                           buffer_depth=max(24, max_burst + 8))
    rng = random.Random(3)
    word = data_width // 8
    image = [rng.getrandbits(data_width) for _ in range(512)]
    commands = [(0, 1), (250 * word, 20), (7 * word, 140), (3 * word, 0), (100 * word, 3),
                (UPPER_DDR + 500 * word, 24), (255 * word, 2)]
    got, expected, bursts, flags = _simulate_harness(harness, image, commands, seed=5)
    assert got == expected
    assert bursts == [b for a, n in commands for b in harness.master.bursts(a, n)]
    assert {k: v for k, v in flags.items() if k != "cycles"} == {
        "violations": 0, "r_stalled": 0, "error": 0, "idle": 1}


def test_expected_cycles_exact_when_latency_hidden_amaranth_sim():
    """Random small configurations without stalls: whenever ``hides_latency`` holds, the
    measured cycles equal ``expected_cycles``; they are never fewer."""
    rng = random.Random(4)
    hidden = 0
    for _ in range(8):
        b, w = rng.choice([(1, 1), (1, 2), (3, 4), (2, 3)])
        latency, max_burst = rng.randint(2, 30), rng.choice([4, 8, 16])
        # Sized around the documented condition, so that both sides of it are exercised.
        in_flight = b * (latency + 2) / w
        config = dict(latency=latency, beats_per_window=b, window=w, max_burst=max_burst,
                      max_outstanding=max(1, 2 + math.ceil(in_flight / max_burst)
                                          + rng.choice([-1, 0, 0, 1])),
                      buffer_depth=max_burst + math.ceil(b * (latency + 4) / w)
                      + rng.choice([-2, 0, 0, 3]))
        harness = read_harness(depth=256, data_width=8 * WORD, **config)
        commands = [(rng.randrange(1000) * WORD, rng.randint(1, 100))
                    for _ in range(rng.randint(1, 3))]
        image = [rng.getrandbits(128) for _ in range(256)]
        got, expected, _, flags = _simulate_harness(harness, image, commands, seed=0,
                                                    p_cmd=1.0, p_ready=1.0)
        assert got == expected
        job = ReadJob(commands, harness.ddr.ddr)
        bound = harness.master.expected_cycles(job)
        assert flags["cycles"] >= bound, config
        if harness.master.hides_latency(job):
            hidden += 1
            assert flags["cycles"] == bound, config
    assert hidden >= 4


def test_ddr_model_latency_id_echo_and_rule_flags_amaranth_sim():
    ddr = DdrModel(depth=256, data_width=128, addr_width=AXI_ADDR_WIDTH, id_width=3,
                   ddr=DdrSimConfig(latency=5))
    image = list(range(1000, 1256))
    log = []

    async def ar(ctx, addr, arlen, *, arid=0, burst=1, size=4):
        ctx.set(ddr.axi.ar.araddr, addr)
        ctx.set(ddr.axi.ar.arlen, arlen)
        ctx.set(ddr.axi.ar.arid, arid)
        ctx.set(ddr.axi.ar.arburst, burst)
        ctx.set(ddr.axi.ar.arsize, size)
        ctx.set(ddr.axi.ar.arvalid, 1)
        await ctx.tick()
        ctx.set(ddr.axi.ar.arvalid, 0)

    async def testbench(ctx):
        for i, word in enumerate(image):
            ctx.set(ddr.load.valid, 1)
            ctx.set(ddr.load.payload.word_addr, i)
            ctx.set(ddr.load.payload.data, word)
            await ctx.tick()
        ctx.set(ddr.load.valid, 0)
        ctx.set(ddr.axi.r.rready, 1)
        await ar(ctx, 16 * 10, 2, arid=5)           # taken on cycle 0
        await ar(ctx, 16 * 40, 0, arid=2)
        for cycle in range(1, 20):
            _, _, rvalid, rdata, rid, rlast = await ctx.tick().sample(
                ddr.axi.r.rvalid, ddr.axi.r.rdata, ddr.axi.r.rid, ddr.axi.r.rlast)
            if rvalid:
                log.append((cycle, rdata, rid, rlast))
        assert int(ctx.get(ddr.violations.as_value())) == 0
        await ar(ctx, 16 * 255, 1)                  # crosses 4 KiB
        await ar(ctx, 8, 0)                         # unaligned
        await ar(ctx, 0, 0, burst=0)                # FIXED
        await ar(ctx, 0, 0, size=3)                 # half width
        await ctx.tick().repeat(30)
        violations = ctx.get(ddr.violations)
        assert (violations.crosses_4k, violations.unaligned, violations.not_incr,
                violations.wrong_size) == (1, 1, 1, 1)

    sim = Simulator(ddr)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    # latency 5 cycles from the AR handshake, bursts back to back, in order, rid echoed.
    assert log == [(4, 1010, 5, 0), (5, 1011, 5, 0), (6, 1012, 5, 1), (7, 1040, 2, 1)]


def test_burst_split_follows_axi4_rules():
    rng = random.Random(11)
    for _ in range(500):
        word = rng.choice([16, 32, 64])
        max_burst = rng.choice([1, 16, 256])
        addr, length = rng.randrange(1 << 20), rng.randrange(600)
        bursts = split_bursts(addr, length, bytes_per_beat=word, max_burst=max_burst)
        assert sum(n for _, n in bursts) == length
        at = addr - addr % word
        for start, beats in bursts:
            assert start == at and 1 <= beats <= max_burst
            assert start // PAGE_BYTES == (start + beats * word - 1) // PAGE_BYTES
            at += beats * word
    assert split_bursts(0, 257, bytes_per_beat=16) == [(0, 256), (4096, 1)]
    assert split_bursts(4032, 12, bytes_per_beat=16) == [(4032, 4), (4096, 8)]


def test_beat_cycles_match_the_token_bucket():
    for b, w in [(1, 1), (1, 2), (3, 4), (5, 7), (2, 9)]:
        cap, tokens, sent, cycle = w + b - 1, w + b - 1, 0, 0
        while sent < 50:
            if tokens >= w:
                sent += 1
                assert AxiReadMaster.beat_cycles(sent, beats_per_window=b, window=w) == cycle + 1
                tokens -= w
            tokens = min(tokens + b, cap)
            cycle += 1


@pytest.mark.parametrize("make, message", [
    (lambda: AxiReadMaster(data_width=128, max_outstanding=4, max_burst=257),
     "max_burst must be an integer from 1 to 256"),
    (lambda: AxiReadMaster(data_width=96, max_outstanding=4), "data_width must be a power of two"),
    (lambda: AxiReadMaster(data_width=128, max_outstanding=4, max_burst=64, buffer_depth=32),
     "buffer_depth must be"),
    (lambda: AxiReadMaster(data_width=128, max_outstanding=4, addr_width=8),
     "addr_width must be"),
    (lambda: DdrModel(depth=1000, data_width=128, addr_width=40, ddr=DdrSimConfig()),
     "depth must be a power of two"),
    # The DDR's timing is the board's [ddr_sim], refused there.
    (lambda: DdrSimConfig(latency=1), "latency must be"),
    (lambda: DdrSimConfig(beats_per_window=3, window=2), "beats_per_window must be"),
])
def test_bad_parameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
