# amaranth: UnusedElaboratable=no
"""The write side: AxiWriteMaster writing DdrModel's write port, on Verilator (cocotb).

Each configuration is built once (``DdrHarness`` around the master, a ``DdrModel`` with
``write=True``) and runs every phase in one launch of the generic testbench: a random image is
preloaded through the backdoor, then write phases (one word, a burst of 256 and 257 words,
commands crossing 4 KiB boundaries, many one- and three-word commands back to back, a write in
the KV260's upper DDR window), each followed by a read-back phase through the model's
``peek`` port that compares every word of the memory with ``AxiWriteMaster.model``, so a
word written twice, at the wrong address or not at all, and a stray write anywhere, fail.
Write phases run under random idle on ``cmd`` and ``data`` and backpressure on ``done``, and
without stalls, where the measured cycles must equal ``AxiWriteMaster.expected_cycles``
exactly. The DDR model's AXI4 write-rule flags and the master's ``error`` must stay clear.
"""

import random

import pytest

from trilut.config import DdrSimConfig
from trilut.hdl.memory.axi import PAGE_BYTES
from trilut.hdl.memory.axi_write import AxiWriteMaster, WriteJob
from trilut.sim.ddr_model import DdrHarness, DdrModel
from trilut.sim.transport import run_stream_on
from trilut.transport import StreamPhase, StreamRun

DEPTH = 1024                    # 128-bit words: 16 KiB, 4 pages; addresses alias modulo this
WORD = 16
UPPER_DDR = 0x8_0000_0000

CONFIGS = {
    "full-rate-b2": dict(beats_per_window=1, window=1, b_latency=2, max_outstanding=4),
    "third-rate-b9": dict(beats_per_window=1, window=3, b_latency=9, max_outstanding=2),
    "3of4-rate-16-beat-bursts": dict(beats_per_window=3, window=4, b_latency=5,
                                     max_outstanding=3, max_burst=16),
}

#: Write phases: (name, commands as (byte address, words)).
WRITES = [
    ("one-word", [(0x40, 1)]),
    ("burst-256", [(0x1000, 256)]),
    ("burst-257-crossing", [(0x0F00, 257)]),
    ("short-commands", [(0x2000 + 48 * i, 3) for i in range(12)] +
                       [(0x3000 + 16 * i, 1) for i in range(10)]),
    ("upper-window-crossing", [(UPPER_DDR + 0x2F80, 40)]),
]


def _word_index(addr: int) -> int:
    return (addr // WORD) % DEPTH


def _build(config: dict):
    cfg = dict(config)
    master = AxiWriteMaster(data_width=128, addr_width=40, max_outstanding=cfg["max_outstanding"],
                            max_burst=cfg.get("max_burst", 256))
    ddr = DdrModel(depth=DEPTH, data_width=128, addr_width=40, write=True,
                   ddr=DdrSimConfig(latency=8, beats_per_window=cfg["beats_per_window"],
                                    window=cfg["window"]),
                   b_latency=cfg["b_latency"])
    return master, DdrHarness(master, ddr)


def _run(name: str, config: dict, tmp_path, *, stall: float, seed: int):
    master, top = _build(config)
    rng = random.Random(seed)
    image = [rng.getrandbits(128) for _ in range(DEPTH)]
    memory = list(image)
    phases, cycles = [], {}
    for i, (phase_name, commands) in enumerate(WRITES):
        words = [rng.getrandbits(128) for _ in range(sum(n for _, n in commands))]
        # The DDR model aliases addresses modulo its depth; the master's model writes a
        # flat list, so the commands go to it as word indices of the aliased memory.
        flat = [(_word_index(a) * WORD, n) for a, n in commands]
        assert all(_word_index(a) + n <= DEPTH for a, n in commands)
        memory = master.model(memory, flat, words)
        job = WriteJob(commands, beats_per_window=config["beats_per_window"],
                       window=config["window"], b_latency=config["b_latency"])
        expected = None if stall else master.expected_cycles(job)
        cycles[phase_name] = expected
        phases.append(StreamPhase(
            name=phase_name, stall=stall, seed=seed + i, expected_cycles=expected,
            inputs={"cmd": [a | n << 40 for a, n in commands], "data": words},
            expected={"done": [0] * len(commands)}))
        phases.append(StreamPhase(
            name=f"{phase_name}-read-back", stall=stall, seed=seed + 50 + i,
            inputs={"peek": list(range(DEPTH))}, expected={"peek_data": list(memory)}))
    run = StreamRun(phases, memory=dict(enumerate(image)),
                    clean_flags=("write_violations", "error"))
    results = run_stream_on(top, run, name="axi_write", run_dir=tmp_path / name)
    return results, cycles


@pytest.mark.rtl
@pytest.mark.parametrize("setting", sorted(CONFIGS))
def test_writes_land_exactly_in_the_exact_cycles(setting, tmp_path):
    results, cycles = _run(setting, CONFIGS[setting], tmp_path, stall=0.0, seed=3)
    for phase in results:
        if phase.name in cycles:
            print(f"{setting} {phase.name}: {phase.cycles} cycles")
            assert phase.cycles == cycles[phase.name], phase.name


@pytest.mark.rtl
@pytest.mark.parametrize("setting", sorted(CONFIGS))
def test_writes_land_exactly_under_random_stalls(setting, tmp_path):
    # The testbench compares every done beat and every read-back word; stalls on every stream.
    results, _ = _run(setting, CONFIGS[setting], tmp_path, stall=0.35, seed=11)
    assert len(results) == 2 * len(WRITES)


# ---- fast: the model and the parameter checks ----------------------------------------------

@pytest.mark.fast
def test_bursts_follow_the_read_masters_split():
    master = AxiWriteMaster(data_width=128, addr_width=40, max_outstanding=4)
    assert master.bursts(0x0F00, 257) == [(0x0F00, 16), (0x1000, 241)]
    assert master.bursts(0x1000, 300) == [(0x1000, 256), (0x2000, 44)]
    assert all((a % PAGE_BYTES) + n * WORD <= PAGE_BYTES
               for a, n in master.bursts(0x0F10, 1000))


@pytest.mark.fast
def test_model_writes_in_command_order_and_refuses_mismatched_data():
    master = AxiWriteMaster(data_width=128, addr_width=40, max_outstanding=4)
    assert master.model([0] * 8, [(16, 2), (32, 1)], [5, 6, 7]) == [0, 5, 7, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="3 data words for commands of 2 words"):
        master.model([0] * 8, [(16, 2)], [5, 6, 7])
    with pytest.raises(ValueError, match="at least one word"):
        master.model([0] * 8, [(16, 0)], [])


@pytest.mark.fast
@pytest.mark.parametrize("build, message", [
    (lambda: AxiWriteMaster(data_width=100, addr_width=40, max_outstanding=4),
     "data_width must be a power of two"),
    (lambda: AxiWriteMaster(data_width=128, addr_width=40, max_outstanding=0),
     "max_outstanding must be"),
    (lambda: AxiWriteMaster(data_width=128, addr_width=40, max_outstanding=4, max_burst=300),
     "max_burst must be"),
    (lambda: WriteJob([], beats_per_window=1, window=1, b_latency=2), "at least one word"),
    (lambda: WriteJob([(0, 4)], beats_per_window=2, window=1, b_latency=2),
     "beats_per_window must be"),
    (lambda: DdrModel(depth=64, data_width=128, addr_width=40, ddr=DdrSimConfig(), write=True,
                      b_latency=0), "b_latency must be"),
])
def test_bad_parameters_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()
