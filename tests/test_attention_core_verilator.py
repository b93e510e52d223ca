# amaranth: UnusedElaboratable=no
"""The attention core (``hdl/attention/core.py``) on Verilator: prefill chunks and decode steps
of one layer each, against the KV cache in the DDR model, bit-exact with level 2.

Per DDR setting (full rate, latency 20; one beat every 2 cycles, latency 40) one build runs,
in ONE simulation (the DDR's state carried from phase to phase): for MHA (4 / 4, layer 0),
GQA (4 / 2, layer 1: two chunks, the second ``plain``) and MQA (4 / 1, layer 2) a prompt
prefill (lengths that are and are not a multiple of ``n_pe``), then 8 decode steps reading
the cache the prefill wrote; random stalls on every stream (the last decode step of each
layout and the MHA prefill run stall-free: their cycles are printed). The DDR starts with
random words, so a read of a row not written is seen; at the end the whole memory is read
back through the model's ``peek`` port and compared with the level-2 cache placed by
``KvLayout``. Expected outputs are ``models.attention.online_attention`` /
``two_pass_attention`` on that level-2 cache, not the core's own model (which is checked
against them).
"""

import numpy as np
import pytest

from trilut.config import DdrSimConfig
from trilut.hdl.attention.core import AttentionCore, CoreJob
from trilut.models import attention as att
from trilut.models import fp16 as fp
from trilut.models.kv_cache import KvLayout
from trilut.models.numerics import lane_beats

FP16 = fp.FP16
WORD_BITS = 128
DEPTH = 4096                                      # 128-bit words: 64 KiB
B_LATENCY = 4                                     # the DDR model's write response

#: name -> (lanes, head_dim, n_pe, DDR latency, beats per window, window).
CONFIGS = {
    "l8-d32-pe2-full": (8, 32, 2, 20, 1, 1),
    "l4-d16-pe4-slow": (4, 16, 4, 40, 1, 2),
}
#: (heads, kv_heads, layer, prefill chunks as (tokens, plain)); then DECODE_STEPS decodes.
LAYOUTS = [(4, 4, 0, [(6, False)]), (4, 2, 1, [(5, False), (3, True)]),
           (4, 1, 2, [(8, False)])]
DECODE_STEPS = 8


def _core(lanes, head_dim, n_pe):
    layout = KvLayout(layers=3, kv_heads=4, max_context=32, head_dim=head_dim)
    return AttentionCore(layout, lanes=lanes, n_pe=n_pe, max_heads=4, max_group=4,
                         word_bits=WORD_BITS, addr_width=40, max_outstanding=4, max_burst=16,
                         buffer_depth=64)


def _codes(rng, shape, scale=1.0):
    return FP16.from_float(rng.standard_normal(shape) * scale)


class Level2Cache:
    """The level-2 model's KV cache: per layer ``k, v[kv_heads, max_context, d]`` fp16 codes
    (zeros where nothing was written), and the jobs that fill and read it."""

    def __init__(self, layout: KvLayout):
        self.layout = layout
        shape = (layout.layers, layout.kv_heads, layout.max_context, layout.head_dim)
        self.k = np.zeros(shape, dtype=np.uint16)
        self.v = np.zeros(shape, dtype=np.uint16)
        self.written = np.zeros(shape[:3], dtype=bool)

    def step(self, job: CoreJob, q, k_new, v_new, lanes: int):
        """Store the chunk's rows (``[T, H_kv, d]``) and return the level-2 output."""
        s, t, h = job.start, job.tokens, job.kv_heads
        self.k[job.layer, :h, s:s + t] = np.swapaxes(k_new, 0, 1)
        self.v[job.layer, :h, s:s + t] = np.swapaxes(v_new, 0, 1)
        self.written[job.layer, :h, s:s + t] = True
        k, v = self.k[job.layer, :h], self.v[job.layer, :h]
        if job.prefill:
            return att.online_attention(q, k, v, start=s, lanes=lanes), k, v
        return att.two_pass_attention(q, k, v, position=s, lanes=lanes), k, v

    def memory(self, initial: dict, word_bits: int) -> dict:
        """``initial`` with every written row placed at its ``KvLayout`` address."""
        lay, word_bytes = self.layout, word_bits // 8
        memory = dict(initial)
        for kind, cache in (("k", self.k), ("v", self.v)):
            for layer, head, pos in zip(*np.nonzero(self.written)):
                words = lay.rows_to_words(cache[layer, head, pos], word_bits)
                first = lay.address(kind, int(layer), int(head), int(pos)) // word_bytes
                for i, w in enumerate(words):
                    memory[first + i] = w
        return memory


def _jobs(core, rng, ddr=None):
    """Every job of the run, in order: (label, job, q, k_new, v_new, stall)."""
    lay, d = core.layout, core.layout.head_dim
    out = []
    for heads, kv_heads, layer, chunks in LAYOUTS:
        tag = f"{heads}x{kv_heads}"
        start = 0
        for i, (tokens, plain) in enumerate(chunks):
            job = CoreJob(lay, layer=layer, start=start, tokens=tokens, heads=heads,
                          kv_heads=kv_heads, prefill=True, plain=plain, ddr=ddr,
                          b_latency=B_LATENCY)
            stall = 0.0 if (kv_heads == heads or plain) else 0.3
            out.append((f"{tag}-prefill{start}+{tokens}", job, _codes(rng, (heads, tokens, d)),
                        _codes(rng, (tokens, kv_heads, d)), _codes(rng, (tokens, kv_heads, d)),
                        stall))
            start += tokens
        for step in range(DECODE_STEPS):
            job = CoreJob(lay, layer=layer, start=start, tokens=1, heads=heads,
                          kv_heads=kv_heads, prefill=False, ddr=ddr, b_latency=B_LATENCY)
            stall = 0.0 if step == DECODE_STEPS - 1 else 0.3
            out.append((f"{tag}-decode{start}", job, _codes(rng, (heads, 1, d), 2.0),
                        _codes(rng, (1, kv_heads, d)), _codes(rng, (1, kv_heads, d)), stall))
            start += 1
    return out


@pytest.mark.rtl
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_from_the_cache_bit_exact(name, tmp_path):
    from trilut.sim.ddr_model import DdrHarness, DdrModel
    from trilut.sim.transport import run_stream_on
    from trilut.transport import StreamPhase, StreamRun

    lanes, d, n_pe, latency, b, w = CONFIGS[name]
    core = _core(lanes, d, n_pe)
    ddr_timing = DdrSimConfig(latency=latency, beats_per_window=b, window=w)
    ddr = DdrModel(depth=DEPTH, data_width=WORD_BITS, addr_width=40, write=True,
                   ddr=ddr_timing, b_latency=B_LATENCY)
    rng = np.random.default_rng(sum(map(ord, name)))
    initial = {a: int.from_bytes(rng.bytes(WORD_BITS // 8), "little") for a in range(DEPTH)}
    level2 = Level2Cache(core.layout)
    model_memory = dict(initial)
    phases, timed = [], {}
    for seed, (label, job, q, k_new, v_new, stall) in enumerate(_jobs(core, rng, ddr_timing)):
        expected, k, v = level2.step(job, q, k_new, v_new, lanes)
        model_memory, model_out = core.model(model_memory, job, q, k_new, v_new)
        np.testing.assert_array_equal(model_out, expected)          # the composed model
        if job.prefill:
            streams = att.prefill_streams(q, k, v, start=job.start, n_pe=n_pe, lanes=lanes,
                                          plain=job.plain, out=expected)
        else:
            streams = att.decode_streams(q, k, v, position=job.start, lanes=lanes,
                                         out=expected)
        kv_new = lane_beats(np.concatenate([k_new.reshape(-1, d), v_new.reshape(-1, d)]), lanes)
        cycles = None if stall else core.expected_cycles(job)
        timed[label] = cycles
        phases.append(StreamPhase(
            name=label, inputs={"kv_new": kv_new, "q": streams["q"]},
            expected={"out": streams["out"]}, scalars=core.scalars(job), stall=stall,
            expected_cycles=cycles,
            seed=seed, flags={"idle": 1}, settle_cycles=20, timeout_cycles=200_000))
    final = level2.memory(initial, WORD_BITS)
    assert final == model_memory
    phases.append(StreamPhase(name="read-back", inputs={"peek": list(range(DEPTH))},
                              expected={"peek_data": [final[a] for a in range(DEPTH)]}))
    results = run_stream_on(
        DdrHarness(core, ddr),
        StreamRun(phases, memory=initial, clean_flags=("violations", "write_violations",
                                                        "error", "r_stalled")),
        name=f"attention_core_{name.replace('-', '_')}", run_dir=tmp_path)
    for result in results:
        if timed.get(result.name) is not None:
            print(f"{name} {result.name}: {result.cycles} cycles "
                  f"(expected {timed[result.name]})")
            assert result.cycles == timed[result.name], result.name


# --------------------------------------------------------------------------------------------
# Fast tier.

@pytest.mark.fast
def test_context_overflow_is_refused_with_the_layout_message():
    core = _core(8, 32, 2)
    lay = core.layout
    with pytest.raises(ValueError, match="30 positions in the KV cache plus 3 new token\\(s\\) "
                                         "exceed the context of 32 positions"):
        CoreJob(lay, layer=0, start=30, tokens=3, heads=4, kv_heads=4, prefill=True)
    with pytest.raises(ValueError, match="32 positions in the KV cache plus 1 new"):
        CoreJob(lay, layer=0, start=32, tokens=1, heads=4, kv_heads=4, prefill=False)
    with pytest.raises(ValueError, match="a decode step writes one token, not 2"):
        CoreJob(lay, layer=0, start=3, tokens=2, heads=4, kv_heads=4, prefill=False)
    with pytest.raises(ValueError, match="layer must be an integer from 0 to 2"):
        CoreJob(lay, layer=3, start=0, tokens=1, heads=4, kv_heads=4, prefill=False)
    wide = KvLayout(layers=3, kv_heads=8, max_context=32, head_dim=32)
    core8 = AttentionCore(wide, lanes=8, n_pe=2, max_heads=8, max_group=4, word_bits=128,
                          addr_width=40, max_outstanding=4)
    with pytest.raises(ValueError, match="exceeds max_group = 4"):
        core8.check_job(CoreJob(wide, layer=0, start=0, tokens=1, heads=8, kv_heads=1,
                                prefill=False))
    with pytest.raises(ValueError, match="a 128-bit DDR word must be a power-of-two number of 256-bit lane beats"):
        AttentionCore(lay, lanes=16, n_pe=2, max_heads=4, max_group=4, word_bits=128,
                      addr_width=40, max_outstanding=4)


@pytest.mark.fast
def test_read_commands_follow_the_units_stream_orders():
    core = _core(8, 32, 2)
    lay = core.layout
    dec = CoreJob(lay, layer=1, start=5, tokens=1, heads=4, kv_heads=2, prefill=False)
    assert dec.read_commands(16, 2) == [
        (lay.address("k", 1, 0, 0), 6 * 4), (lay.address("v", 1, 0, 0), 6 * 4),
        (lay.address("k", 1, 1, 0), 6 * 4), (lay.address("v", 1, 1, 0), 6 * 4)]
    pre = CoreJob(lay, layer=0, start=2, tokens=3, heads=2, kv_heads=1, prefill=True)
    # Batches: tokens 2, 1 (keys 0..4), then token 0 (keys 0..2).
    keys = [0, 1, 2, 3, 4, 0, 1, 2]
    assert pre.read_commands(16, 2) == [(lay.address(kind, 0, 0, j), 4)
                                        for j in keys for kind in ("k", "v")]
    with pytest.raises(ValueError, match="the cycle model needs the DDR's timing"):
        core.expected_cycles(pre)
    timed = CoreJob(lay, layer=0, start=2, tokens=3, heads=2, kv_heads=1, prefill=True,
                    ddr=DdrSimConfig(latency=20), b_latency=4)
    slower = CoreJob(lay, layer=0, start=2, tokens=3, heads=2, kv_heads=1, prefill=True,
                     ddr=DdrSimConfig(latency=40, beats_per_window=1, window=2), b_latency=4)
    assert core.expected_cycles(slower) > core.expected_cycles(timed)
    k_job, v_job = pre.write_jobs()
    assert (k_job.base, v_job.base) == (lay.k_base, lay.v_base)
    assert core.memory_blocks()["bram36"] > 0
