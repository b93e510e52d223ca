# amaranth: UnusedElaboratable=no
"""The AXI4 read arbiter: several AxiReadMasters on one DDR port, on Verilator and amaranth.sim.

:class:`AxiReadPorts` (here, a test wrapper) is ``ports`` ``AxiReadMaster``s behind one
``AxiReadArbiter``: streams ``cmd{i}`` / ``data{i}``, ``axi`` the arbiter's ``m``, ``error``
(any master's) and ``idle`` (all masters'). ``DdrHarness`` puts it on a ``DdrModel`` with the
arbiter's ID width, so the generic testbench (``run_stream_on``) drives it.

Every port reads its own address region (port ``i`` at ``i << 32``; the DDR model aliases
addresses modulo its depth, so the regions read the same 16 KiB image, but ``ar_monitor``'s
addresses tell the ports apart): interleaved commands of 1..300 words from random word
addresses, so that many cross 4 KiB. For 2 and 3 ports and two DDR settings (full rate at
latency 20, half rate at latency 40), two simulator launches of one build:

* under random stalls on every ``cmd`` and ``data`` stream: all ports at once, each port
  alone, and all at once with only ``data`` backpressured. Every word of every port checked
  bit for bit, in order, and nothing after the last (``settle_cycles``, ``quiet_cycles``).
* without stalls, with ``ar_monitor`` expected: each port alone (the cycles exact, equal to
  ``AxiReadMaster.expected_cycles`` at one cycle more latency), then all ports at once, twice
  (long and short commands): the AR sequence exactly as the round robin gives it and the
  cycles exact, both from ``AxiReadArbiter.schedule``.

Each phase ends with every master idle; the DDR's rule flags, ``r_stalled`` and ``error``
stay clear. The arbiter is also run once against cocotbext-axi's ``AxiRamRead`` (through
``FlatAxiPorts``, with the arbiter's real IDs), the cocotb testbench being in this file.
Fast tier: the parameter refusals. amaranth.sim: the grant rule under random ``arvalid`` /
``arready`` patterns, cycle by cycle, and the AR payload held while stalled.
"""

import random
from dataclasses import replace

import pytest
from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from trilut.config import DdrSimConfig
from trilut.hdl.memory.axi import PAGE_BYTES, AxiReadMaster, AxiReadSignature, ReadJob
from trilut.hdl.memory.axi_arbiter import AxiReadArbiter, AxiReadArbiterJob
from trilut.sim.ddr_model import DdrHarness, DdrModel
from trilut.sim.runner import run_case
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

DEPTH = 1024                    # DDR words: 16 KiB, 4 pages (see test_axi_read_verilator.py)
WORD = 16
ADDR_WIDTH = 40
REGION = 1 << 32                # port i's addresses start at i * REGION

CONFIGS = {
    "full-rate-latency20": dict(ddr=DdrSimConfig(latency=20), max_outstanding=4),
    "half-rate-latency40": dict(ddr=DdrSimConfig(latency=40, beats_per_window=1, window=2),
                                max_outstanding=3),
}


class AxiReadPorts(wiring.Component):
    """``ports`` :class:`AxiReadMaster`\\ s (``masters``) on one :class:`AxiReadArbiter`
    (``arbiter``): ``cmd{i}`` in and ``data{i}`` out (master ``i``'s), ``axi`` out (the
    arbiter's ``m``), ``error`` (any master's) and ``idle`` (every master's) out."""

    def __init__(self, *, ports: int, data_width: int, addr_width: int, max_outstanding: int,
                 **master):
        self.arbiter = AxiReadArbiter(ports=ports, data_width=data_width,
                                      addr_width=addr_width)
        self.masters = [AxiReadMaster(data_width=data_width, addr_width=addr_width,
                                      max_outstanding=max_outstanding, **master)
                        for _ in range(ports)]
        members = {}
        for i, master in enumerate(self.masters):
            members[f"cmd{i}"] = In(stream.Signature(master.cmd_layout))
            members[f"data{i}"] = Out(stream.Signature(data_width))
        members.update({
            "axi": Out(AxiReadSignature(data_width=data_width, addr_width=addr_width,
                                        id_width=self.arbiter.id_width)),
            "error": Out(1),
            "idle": Out(1),
        })
        super().__init__(members)

    def job(self, commands, ddr: DdrSimConfig, last_grant: int) -> AxiReadArbiterJob:
        return AxiReadArbiterJob(masters=tuple(self.masters),
                                 commands=tuple(tuple(c) for c in commands), ddr=ddr,
                                 last_grant=last_grant)

    def elaborate(self, platform):
        m = Module()
        m.submodules.arbiter = arbiter = self.arbiter
        errors, idles = [], []
        for i, master in enumerate(self.masters):
            m.submodules[f"master{i}"] = master
            wiring.connect(m, wiring.flipped(getattr(self, f"cmd{i}")), master.cmd)
            wiring.connect(m, master.data, wiring.flipped(getattr(self, f"data{i}")))
            wiring.connect(m, master.axi, arbiter.slave(i))
            errors.append(master.error)
            idles.append(master.idle)
        wiring.connect(m, arbiter.m, wiring.flipped(self.axi))
        m.d.comb += [self.error.eq(sum(errors) != 0), self.idle.eq(sum(idles) == len(idles))]
        return m


class Aliased:
    """The memory as a model sees it: word address modulo its depth."""

    def __init__(self, image):
        self.image = image

    def __getitem__(self, word):
        return self.image[word % len(self.image)]


def _commands(rng, port: int, count: int, longest: int = 300) -> list[tuple[int, int]]:
    """``count`` reads of 1..``longest`` words from random words of port ``port``'s region
    (most of the long ones cross a 4 KiB page)."""
    return [(port * REGION + rng.randrange(4 * DEPTH) * WORD, rng.randint(1, longest))
            for _ in range(count)]


def _ar_beats(commands_per_port, masters) -> list[int]:
    """``ar_monitor`` beats (``addr``, then ``len``) of each port's bursts, port after port."""
    return [addr | (beats - 1) << ADDR_WIDTH for commands, master in zip(commands_per_port,
                                                                         masters)
            for a, n in commands for addr, beats in master.bursts(a, n)]


def _phase(ports: AxiReadPorts, image, name, commands_per_port, *, seed, ars=None,
           expected_cycles=None, stall=0.0, stream_stalls=None, latency):
    n = len(ports.masters)
    job = ports.job(commands_per_port, DdrSimConfig(), 0)
    words = ports.arbiter.model(Aliased(image), job)
    expected = {f"data{i}": words[i] for i in range(n)}
    if ars is not None:
        expected["ar_monitor"] = [addr | (beats - 1) << ADDR_WIDTH for _, addr, beats in ars]
    return StreamPhase(
        name=name, seed=seed, stall=stall, stream_stalls=stream_stalls or {},
        inputs={f"cmd{i}": [a | length << ADDR_WIDTH for a, length in commands_per_port[i]]
                for i in range(n) if commands_per_port[i]},
        expected=expected, expected_cycles=expected_cycles,
        settle_cycles=3 * latency + 20, flags={"idle": 1})


def _runs(ports: AxiReadPorts, ddr: DdrSimConfig, rng):
    """The stalled run and the stall-free run (with their command lists and schedules)."""
    n = len(ports.masters)
    image = [rng.getrandbits(8 * WORD) for _ in range(DEPTH)]
    L = ddr.latency
    everyone = [_commands(rng, i, 6) for i in range(n)]
    alone = [[_commands(rng, i, 5) if j == i else [] for j in range(n)] for i in range(n)]
    stalled = [_phase(ports, image, "all-ports-stalls", everyone, seed=1, stall=0.3,
                      latency=L)]
    stalled += [_phase(ports, image, f"port{i}-alone-stalls", alone[i], seed=2 + i, stall=0.3,
                       stream_stalls={f"data{i}": 0.5}, latency=L) for i in range(n)]
    stalled.append(_phase(ports, image, "all-ports-data-stalls",
                          [_commands(rng, i, 8) for i in range(n)], seed=9, stall=0.4,
                          stream_stalls={f"cmd{i}": 0.0 for i in range(n)}, latency=L))

    free, schedules = [], []
    for i in range(n):
        job = ports.job(alone[i], ddr, n - 1)
        schedule = ports.arbiter.schedule(job)
        master_cycles = ports.masters[i].expected_cycles(
            ReadJob(alone[i][i], replace(ddr, latency=L + 1)))
        # One active port: the master's own model, with the AR register's cycle added.
        assert schedule.cycles == master_cycles
        free.append(_phase(ports, image, f"port{i}-alone", alone[i], seed=20 + i,
                           ars=schedule.ars, expected_cycles=schedule.cycles, latency=L))
        schedules.append((job, schedule))
    last = n - 1
    for name, commands in [("all-ports", everyone),
                           ("all-ports-short", [_commands(rng, i, 12, longest=20)
                                                for i in range(n)])]:
        job = ports.job(commands, ddr, last)
        schedule = ports.arbiter.schedule(job)
        free.append(_phase(ports, image, name, commands, seed=30, ars=schedule.ars,
                           expected_cycles=schedule.cycles, latency=L))
        schedules.append((job, schedule))
        last = schedule.last_grant
    memory = dict(enumerate(image))
    clean = ("violations", "r_stalled", "error")
    return (StreamRun(phases=stalled, memory=memory, clean_flags=clean),
            StreamRun(phases=free, memory=memory, clean_flags=clean), schedules, image)


@pytest.mark.rtl
@pytest.mark.parametrize("ports", [2, 3])
@pytest.mark.parametrize("config", CONFIGS)
def test_arbiter_on_verilator(ports, config, tmp_path):
    ddr = CONFIGS[config]["ddr"]
    block = AxiReadPorts(ports=ports, data_width=8 * WORD, addr_width=ADDR_WIDTH,
                         max_outstanding=CONFIGS[config]["max_outstanding"])
    harness = DdrHarness(block, DdrModel(
        depth=DEPTH, data_width=8 * WORD, addr_width=ADDR_WIDTH, id_width=block.arbiter.id_width,
        ddr=ddr))
    stalled, free, schedules, image = _runs(block, ddr, random.Random(ports * 100 + len(config)))
    name = f"axi_read_arbiter{ports}"

    # Stalled: the testbench checks every word of every port, nothing after the last, idle
    # after each phase and the clean flags; the AR channel is checked here, port by port.
    results = run_stream_on(harness, stalled, name=name, run_dir=tmp_path / "stalled")
    for phase, seen in zip(stalled.phases, results, strict=True):
        assert all(seen.outputs[f"data{i}"] == phase.expected[f"data{i}"] for i in range(ports))

    # Stall-free: the ARs in the round-robin order and the cycles, exact.
    results = run_stream_on(harness, free, name=name, run_dir=tmp_path / "free")
    for phase, seen, (job, schedule) in zip(free.phases, results, schedules, strict=True):
        mask = (1 << ADDR_WIDTH) - 1
        ars = [(beat & mask, (beat >> ADDR_WIDTH) + 1) for beat in seen.outputs["ar_monitor"]]
        assert ars == [(addr, beats) for _, addr, beats in schedule.ars], phase.name
        for port in range(ports):
            mine = [(a, b) for a, b in ars if a // REGION == port]
            assert mine == [b for a, n in job.commands[port]
                            for b in block.masters[port].bursts(a, n)], phase.name
        for addr, beats in ars:
            assert addr // PAGE_BYTES == (addr + beats * WORD - 1) // PAGE_BYTES
        assert seen.cycles == schedule.cycles == phase.expected_cycles, phase.name
        data = [seen.handshakes[f"data{i}"] for i in range(ports)]
        print(f"{config} {ports} ports {phase.name}: {seen.cycles} cycles (expected "
              f"{schedule.cycles}), {sum(map(len, data))} words, "
              f"{len(ars)} ARs, first word at {min(d[0] for d in data if d)}")
        if phase.name.startswith("port"):
            # The first word: 2 cycles to the master's AR, 1 through the arbiter, the
            # latency, 2 through the master's buffer.
            port = int(phase.name[4])
            assert data[port][0] == 5 + ddr.latency


# ---- against cocotbext-axi's AxiRamRead ----------------------------------------------------

EXTERNAL_SIZE = 1 << 16
EXTERNAL_REGION = 1 << 14       # port i reads its own 16 KiB of the RAM


@pytest.mark.rtl
@pytest.mark.parametrize("stall", [0.0, 0.3])
def test_arbiter_against_cocotbext_axi_ram(stall, tmp_path):
    from trilut.sim.external_axi import FlatAxiPorts

    ports = 3
    block = AxiReadPorts(ports=ports, data_width=8 * WORD, addr_width=ADDR_WIDTH,
                         max_outstanding=4)
    rng = random.Random(13)
    memory = [rng.getrandbits(8 * WORD) for _ in range(EXTERNAL_SIZE // WORD)]
    commands = [[(i * EXTERNAL_REGION + 0xF00, 257), (i * EXTERNAL_REGION + 0x40, 1)]
                + [(i * EXTERNAL_REGION + rng.randrange(512) * WORD, rng.randint(1, 300))
                   for _ in range(4)] for i in range(ports)]
    top = FlatAxiPorts(block)
    assert "axi_arid" in top.signature.members and len(top.axi_arid) == 2   # the real IDs
    used = sorted({a // WORD + k for c in commands for a, n in c for k in range(n)})
    case = {"kind": "read", "size": EXTERNAL_SIZE, "word_bytes": WORD,
            "addr_width": ADDR_WIDTH, "image": [(w * WORD, memory[w]) for w in used],
            "ports": [str(i) for i in range(ports)], "commands": commands, "stall": stall,
            "seed": 17}
    seen, _ = run_case(top, name="axi_read_arbiter_external",
                       test_module="trilut.sim.tb_external_axi", case=case, run_dir=tmp_path)
    job = block.job(commands, DdrSimConfig(), ports - 1)
    assert seen["data"] == block.arbiter.model(memory, job)
    assert seen["extra_data"] == [0] * ports and seen["error"] == 0 and seen["idle"] == 1


# ---- amaranth.sim: the grant rule, cycle by cycle ------------------------------------------

@pytest.mark.rtl
@pytest.mark.parametrize("ports", [2, 3, 5])
def test_round_robin_grants_and_held_payloads_amaranth_sim(ports):
    """Random ``arvalid`` (each held, with its payload, until taken, as AXI4 requires of a
    master) and random ``arready`` on ``m``: each cycle the grant must be the first requesting
    port after the last granted one, the AR on ``m`` must hold while stalled, every AR must
    come out once, with its port's ID, in grant order, and R must go to port ``rid`` only."""
    arbiter = AxiReadArbiter(ports=ports, data_width=32, addr_width=32)
    rng = random.Random(ports)
    problems = []

    async def testbench(ctx):
        pending = [None] * ports            # the AR each port holds: (addr, len)
        last, issued, granted, out = ports - 1, 0, [], []
        held = None
        for cycle in range(600):
            for i in range(ports):
                s = arbiter.slave(i)
                if pending[i] is None and rng.random() < 0.5:
                    issued += 1
                    pending[i] = (i << 24 | issued, rng.randrange(256))
                if pending[i] is not None:
                    ctx.set(s.ar.araddr, pending[i][0])
                    ctx.set(s.ar.arlen, pending[i][1])
                    ctx.set(s.ar.arsize, 2)
                    ctx.set(s.ar.arburst, 1)
                ctx.set(s.ar.arvalid, pending[i] is not None)
                ctx.set(s.r.rready, rng.random() < 0.7)
            ready = rng.random() < 0.6
            ctx.set(arbiter.m.ar.arready, ready)
            rid = rng.randrange(ports)
            ctx.set(arbiter.m.r.rid, rid)
            ctx.set(arbiter.m.r.rvalid, 1)
            ctx.set(arbiter.m.r.rdata, cycle)
            valid, addr, arlen, arid = (ctx.get(arbiter.m.ar.arvalid),
                                        ctx.get(arbiter.m.ar.araddr),
                                        ctx.get(arbiter.m.ar.arlen), ctx.get(arbiter.m.ar.arid))
            if held is not None and (valid, addr, arlen, arid) != held:
                problems.append(f"cycle {cycle}: a stalled AR changed: {held} -> "
                                f"{(valid, addr, arlen, arid)}")
            if valid and ready:
                out.append((addr, arlen, arid))
            held = (valid, addr, arlen, arid) if valid and not ready else None
            free = not valid or ready
            requests = [i for i in range(ports) if pending[i] is not None]
            want = (min(requests, key=lambda i: (i - last - 1) % ports)
                    if free and requests else None)
            got = [i for i in range(ports) if ctx.get(arbiter.slave(i).ar.arready)]
            if got != ([] if want is None else [want]):
                problems.append(f"cycle {cycle}: requests {requests} after {last}, "
                                f"free {free}: granted {got}, expected {want}")
            for i in range(ports):
                s = arbiter.slave(i)
                if ctx.get(s.r.rvalid) != (i == rid) or ctx.get(s.r.rdata) != cycle:
                    problems.append(f"cycle {cycle}: R for {rid} reached port {i} wrongly")
            if ctx.get(arbiter.m.r.rready) != ctx.get(arbiter.slave(rid).r.rready):
                problems.append(f"cycle {cycle}: rready is not port {rid}'s")
            if want is not None:
                granted.append((*pending[want], want))
                pending[want] = None
                last = want
            await ctx.tick()
        if not problems:
            expect = granted[:len(out)]
            if out != expect:
                problems.append(f"ARs out {out[:5]}... differ from the grants {expect[:5]}...")
            if len(granted) - len(out) > 1:
                problems.append(f"{len(granted) - len(out)} ARs granted but never out")

    sim = Simulator(arbiter)
    sim.add_clock(4e-9)
    sim.add_testbench(testbench)
    sim.run()
    assert not problems, problems[:5]


# ---- fast tier: refusals ---------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("ports", [0, 1, 17, 2.0, True, "3"])
def test_bad_port_counts_are_refused(ports):
    with pytest.raises(ValueError, match=r"ports must be an integer from 2 to 16"):
        AxiReadArbiter(ports=ports, data_width=128, addr_width=40)


@pytest.mark.fast
def test_bad_widths_and_jobs_are_refused():
    with pytest.raises(ValueError, match="data_width must be a power of two"):
        AxiReadArbiter(ports=2, data_width=96, addr_width=40)
    with pytest.raises(ValueError, match="addr_width must be"):
        AxiReadArbiter(ports=2, data_width=128, addr_width=8)
    arbiter = AxiReadArbiter(ports=2, data_width=128, addr_width=40)
    master = AxiReadMaster(data_width=128, max_outstanding=4)
    with pytest.raises(ValueError, match="needs 2 masters and command lists, not 1 and 1"):
        arbiter.expected_cycles(AxiReadArbiterJob((master,), (((0, 1),),), DdrSimConfig(), 1))
    with pytest.raises(ValueError, match="last_grant must be a port from 0 to 1, not 2"):
        arbiter.expected_cycles(AxiReadArbiterJob((master, master), ((), ()), DdrSimConfig(), 2))
    narrow = AxiReadMaster(data_width=64, max_outstanding=4)
    with pytest.raises(ValueError, match="master 1 is 64 x 40 bits"):
        arbiter.model([0], AxiReadArbiterJob((master, narrow), ((), ()), DdrSimConfig(), 1))


@pytest.mark.fast
def test_id_width_and_memory_blocks():
    assert [AxiReadArbiter(ports=n, data_width=128, addr_width=40).id_width
            for n in (2, 3, 4, 5, 16)] == [1, 2, 2, 3, 4]
    assert AxiReadArbiter(ports=3, data_width=128, addr_width=40).memory_blocks() == {
        "bram36": 0, "uram": 0}


@pytest.mark.fast
def test_one_active_port_schedule_is_the_masters_model_one_cycle_later():
    """The arbiter's event recurrence and ``AxiReadTiming`` agree for one active port, at any
    latency, rate and master shape, latency hidden or not."""
    rng = random.Random(1)
    arbiter = AxiReadArbiter(ports=3, data_width=128, addr_width=40)
    for _ in range(60):
        b, w = rng.choice([(1, 1), (1, 2), (3, 4), (2, 3)])
        latency, max_burst = rng.randint(2, 45), rng.choice([4, 16, 256])
        masters = tuple(AxiReadMaster(data_width=128, max_outstanding=rng.randint(1, 6),
                                      max_burst=max_burst,
                                      buffer_depth=max(3, max_burst) + rng.randint(0, 100))
                        for _ in range(3))
        port = rng.randrange(3)
        commands = [(rng.randrange(2000) * WORD, rng.randint(0, 300))
                    for _ in range(rng.randint(1, 5))] + [(0, 1)]
        job = AxiReadArbiterJob(masters, tuple(tuple(commands) if i == port else ()
                                               for i in range(3)),
                                DdrSimConfig(latency=latency, beats_per_window=b, window=w),
                                last_grant=rng.randrange(3))
        assert arbiter.expected_cycles(job) == masters[port].expected_cycles(
            ReadJob(commands, DdrSimConfig(latency=latency + 1, beats_per_window=b, window=w)))


@pytest.mark.synth
def test_resources():
    from trilut.hdl.resources import estimate

    total = estimate(AxiReadArbiter(ports=3, data_width=128, addr_width=40),
                     name="axi_read_arbiter").total
    print("axi_read_arbiter 3 x 128", total)
    assert total["bram36"] == total["uram"] == total["dsp"] == 0
    assert total["lut"] <= RESOURCES["lut"] and total["ff"] <= RESOURCES["ff"]


#: yosys's figures for 3 ports of 128 bits (docs/memory.md), a little headroom.
RESOURCES = {"lut": 240, "ff": 64}
