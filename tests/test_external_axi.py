# amaranth: UnusedElaboratable=no
"""Our AXI4 masters against an independent slave: cocotbext-axi's ``AxiRam`` on Verilator.

The DDR model (``sim/ddr_model.py``) is ours, so a misreading of AXI4 shared by a master and
the model would pass every other test. Here the write master writes, and the read master
reads, a cocotbext-axi ``AxiRam`` (which asserts on bursts it cannot serve), with and without
random pauses on every channel and stream: every word must land (write) or arrive (read)
exactly as the masters' models say, one ``done`` per command and nothing extra, no error, and
the master idle at the end.
"""

import random

import pytest

from trilut.hdl.memory.axi import AxiReadMaster
from trilut.hdl.memory.axi_write import AxiWriteMaster
from trilut.sim.external_axi import FlatAxiPorts
from trilut.sim.runner import run_case

pytestmark = pytest.mark.rtl

WORD = 16
SIZE = 1 << 16
COMMANDS = [(0x40, 1), (0x0F00, 257), (0x2000, 300)] + [(0x5000 + 48 * i, 3) for i in range(8)]


def _case(kind, rng, *, stall, seed, image=()):
    return {"kind": kind, "size": SIZE, "word_bytes": WORD, "addr_width": 40,
            "image": list(image), "commands": COMMANDS, "stall": stall, "seed": seed}


@pytest.mark.parametrize("stall", [0.0, 0.3])
def test_write_master_against_cocotbext_axi_ram(stall, tmp_path):
    master = AxiWriteMaster(data_width=128, addr_width=40, max_outstanding=4)
    rng = random.Random(5)
    words = [rng.getrandbits(128) for _ in range(sum(n for _, n in COMMANDS))]
    case = {**_case("write", rng, stall=stall, seed=7), "words": words}
    seen, _ = run_case(FlatAxiPorts(master), name="axi_write_external",
                       test_module="trilut.sim.tb_external_axi", case=case, run_dir=tmp_path)
    memory = master.model([0] * (SIZE // WORD), COMMANDS, words)
    expected = [memory[a // WORD:a // WORD + n] for a, n in COMMANDS]
    assert seen["written"] == expected
    assert seen["done"] == [0] * len(COMMANDS) and seen["extra_done"] == 0
    assert seen["error"] == 0 and seen["idle"] == 1


@pytest.mark.parametrize("stall", [0.0, 0.3])
def test_read_master_against_cocotbext_axi_ram(stall, tmp_path):
    master = AxiReadMaster(data_width=128, addr_width=40, max_outstanding=4)
    rng = random.Random(6)
    memory = [rng.getrandbits(128) for _ in range(SIZE // WORD)]
    image = [(a * WORD, memory[a]) for a in sorted({a // WORD + i for a, n in COMMANDS
                                                    for i in range(n)})]
    case = {**_case("read", rng, stall=stall, seed=9, image=image), "ports": [""],
            "commands": [COMMANDS]}
    seen, _ = run_case(FlatAxiPorts(master), name="axi_read_external",
                       test_module="trilut.sim.tb_external_axi", case=case, run_dir=tmp_path)
    assert seen["data"] == [master.model(memory, COMMANDS)]
    assert seen["extra_data"] == [0] and seen["error"] == 0 and seen["idle"] == 1
