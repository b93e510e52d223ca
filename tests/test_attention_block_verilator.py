# amaranth: UnusedElaboratable=no
"""The attention half of a decoder layer (``hdl/decoder/attention_block.py``) on Verilator:
norm -> Q/K/V from DDR weights -> RoPE (table from DDR) -> KV cache written to DDR -> prefill
or decode attention reading it back -> sub-norm -> o_proj from DDR -> residual add, bit-exact
with the level-2 model (``numerics.fp16_attention``).

Per build (a head layout at a DDR setting), ONE simulation carries the DDR from job to job:
two prefill chunks of the prompt (5 tokens, not a multiple of ``n_pe``, then 3 more with the
plain schedule), then 8 decode steps reading the cache the prefill wrote; random stalls 0.3 on
every stream except the last decode step. The DDR's KV region starts with random words, so a
read of a row not written shows. Expected outputs come from ``numerics.fp16_attention`` on the
tiny checkpoint's layer 0 (GQA 4/2) and on variants with 4/4 (MHA) and 4/1 (MQA) heads.
"""

import numpy as np
import pytest
import torch

from ddr_blocks import DATAPATH, ENGINE, SETTINGS

from trilut.hdl.decoder.attention_block import AttentionBlock, AttentionBlockJob
from trilut.host.schedule import ddr_depth_for, weight_feed
from trilut.host.weight_image import compile_weight_image
from trilut.models import attention as at
from trilut.models import numerics as nm
from trilut.models.bitnet import BitNetConfig
from trilut.models.checkpoint import build_tiny_checkpoint, load_checkpoint
from trilut.models.kv_cache import KvLayout

MAX_CONTEXT, MAX_CHUNK, N_PE = 32, 8, 4
#: name -> (KV heads, DDR setting).
BUILDS = {
    "gqa-4x2-full": (2, "ddr-full-rate"),
    "gqa-4x2-half": (2, "ddr-half-rate"),
    "mha-4x4-full": (4, "ddr-full-rate"),
    "mqa-4x1-half": (1, "ddr-half-rate"),
}
CHUNKS = [(5, False), (3, True)]                 # (tokens, plain)
DECODE_STEPS = 8


def _names(layer=0):
    p = f"layers.{layer}"
    return ({k: f"{p}.self_attn.{k}_proj" for k in "qkvo"},
            f"{p}.input_layernorm", f"{p}.self_attn.attn_sub_norm")


def _codes(tensor):
    return np.asarray(tensor).astype(np.float16).view(np.uint16)


def _fp32(value):
    return int(nm.fp32_from_float(np.float64(value)))


def _free_base(used: np.ndarray, words: int, align_words: int) -> int:
    """The first ``align_words``-aligned word address from which ``words`` words are free."""
    for base in range(0, len(used) - words + 1, align_words):
        if not used[base:base + words].any():
            return base
    raise ValueError("the DDR model has no room for the region")


@pytest.mark.rtl
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_attention_half_prefill_then_decode_bit_exact(name, tmp_path_factory, tmp_path):
    from trilut.sim.ddr_model import DdrHarness, DdrModel
    from trilut.sim.transport import run_stream_on
    from trilut.transport import StreamPhase, StreamRun

    kv_heads, setting = BUILDS[name]
    config = BitNetConfig.tiny(num_key_value_heads=kv_heads)
    path = tmp_path_factory.mktemp(f"tiny-{kv_heads}")
    build_tiny_checkpoint(path, config)
    model = load_checkpoint(path)
    C, W = ENGINE.columns_per_cycle, DATAPATH.ddr_word_bits
    image = compile_weight_image(model, ENGINE, ddr_word_bits=W)
    lin, norm_name, sub_name = _names()
    heads, d = config.num_attention_heads, config.head_dim

    # ---- the DDR: weights where the image puts them, then the KV cache and the RoPE table.
    depth = 4 * ddr_depth_for(image, list(lin.values()))
    feeds = {k: weight_feed(image, n, 1, tile_beats=DATAPATH.tile_beats, ddr_depth=depth)
             for k, n in lin.items()}
    memory = {a: w for f in feeds.values() for a, w in f.memory.items()}
    used = np.zeros(depth, dtype=bool)
    used[list(memory)] = True
    word_bytes = W // 8
    probe = KvLayout(layers=1, kv_heads=kv_heads, max_context=MAX_CONTEXT, head_dim=d)
    kv_words = (probe.v_base + probe.region_bytes) // word_bytes
    k_base = _free_base(used, kv_words, 4096 // word_bytes)
    layout = KvLayout(layers=1, kv_heads=kv_heads, max_context=MAX_CONTEXT, head_dim=d,
                      k_base=k_base * word_bytes)
    used[k_base:k_base + kv_words] = True
    rng = np.random.default_rng(sum(map(ord, name)))
    for a in range(k_base, k_base + kv_words):
        memory[a] = int.from_bytes(rng.bytes(word_bytes), "little")
    cos_all, sin_all = at.rope_tables(np.arange(MAX_CONTEXT), d, config.rope_theta)
    table = at.rope_table_beats(cos_all, sin_all, C)
    per_word = W // (16 * C)
    table_words = [sum(b << (16 * C * j) for j, b in enumerate(table[i:i + per_word]))
                   for i in range(0, len(table), per_word)]
    rope_base = _free_base(used, len(table_words), 1)
    memory.update({rope_base + i: w for i, w in enumerate(table_words)})

    block = AttentionBlock(ENGINE, DATAPATH, layout, hidden=config.hidden_size, heads=heads,
                           kv_heads=kv_heads, n_pe=N_PE, max_chunk=MAX_CHUNK)
    ddr = DdrModel(depth=depth, data_width=W, addr_width=len(block.axi_read.ar.araddr),
                   id_width=block.arbiter.id_width, write_id_width=0, write=True,
                   ddr=SETTINGS[setting])

    # ---- the jobs and their level-2 outputs ----------------------------------------------
    values = {k: image.layer_values(n) for k, n in lin.items()}
    scales = tuple(float(image.scale(lin[k])) for k in "qkvo")
    norm_w, sub_w = _codes(image.norm(norm_name)), _codes(image.norm(sub_name))
    k_cache = np.zeros((kv_heads, MAX_CONTEXT, d), dtype=np.uint16)
    v_cache = np.zeros_like(k_cache)
    ids = torch.tensor(list(b"attention, then decode steps"))
    embeddings = nm.fp16_from_float(model.embed_tokens.weight[ids].detach().double().numpy())
    jobs = [(t, True, plain) for t, plain in CHUNKS] + [(1, False, False)] * DECODE_STEPS
    phases, start = [], 0
    for seed, (tokens, prefill, plain) in enumerate(jobs):
        job = AttentionBlockJob(layout, layer=0, start=start, tokens=tokens, prefill=prefill,
                                plain=plain)
        h = embeddings[start:start + tokens]
        cos, sin = cos_all[start:start + tokens], sin_all[start:start + tokens]
        expected = block.model(h, norm_w, sub_w, values["q"], values["k"], values["v"],
                               values["o"], scales, cos, sin, k_cache, v_cache, job)
        o_feed = weight_feed(image, lin["o"], tokens, tile_beats=DATAPATH.tile_beats,
                             ddr_depth=depth)
        last = seed == len(jobs) - 1
        phases.append(StreamPhase(
            name=f"{'prefill' if prefill else 'decode'}{start}+{tokens}",
            stall=0.0 if last else 0.3, seed=seed,
            scalars={"q_scale": _fp32(scales[0]), "k_scale": _fp32(scales[1]),
                     "v_scale": _fp32(scales[2]), "o_scale": _fp32(scales[3]),
                     "rope_base": rope_base * word_bytes},
            inputs={"job": [block.job_payload(job)], "h": nm.lane_beats(h, C),
                    "norm_weight": nm.lane_beats(np.tile(norm_w, (tokens, 1)), C),
                    "sub_norm_weight": nm.lane_beats(np.tile(sub_w, (tokens, 1)), C),
                    "qkv_cmd": [c for _ in range(tokens) for k in "qkv" for c in feeds[k].cmd],
                    "qkv_tiles": [t for _ in range(tokens) for k in "qkv"
                                  for t in feeds[k].tiles],
                    "o_cmd": o_feed.cmd, "o_tiles": o_feed.tiles},
            expected={"y": nm.lane_beats(expected, C)},
            flags={"idle": 1}, settle_cycles=20, timeout_cycles=400_000))
        start += tokens
    results = run_stream_on(
        DdrHarness(block, ddr),
        StreamRun(phases, memory=memory, clean_flags=("violations", "write_violations",
                                                       "error", "r_stalled")),
        name=f"attention_block_{name.replace('-', '_')}", run_dir=tmp_path)
    for result in results:
        print(f"{name} {result.name}: {result.cycles} cycles")
    assert [r.name for r in results] == [p.name for p in phases]


# --------------------------------------------------------------------------------------------
# Fast tier.

@pytest.mark.fast
def test_query_order_and_job_refusals():
    from trilut.hdl.decoder.attention_block import query_order
    from trilut.models.attention import prefill_batches
    # The order of models.attention.prefill_streams: per KV head, batches from the last token.
    order = query_order(tokens=5, heads=4, kv_heads=2, n_pe=2)
    want = [(first - i, h * 2 + g)
            for h, first, queries, _ in prefill_batches(start=0, tokens=5, kv_heads=2, n_pe=2,
                                                        plain=False)
            for i in range(queries) for g in range(2)]
    assert order == want and len(order) == 5 * 4
    assert query_order(tokens=1, heads=4, kv_heads=1, n_pe=4) == [(0, h) for h in range(4)]
    layout = KvLayout(layers=2, kv_heads=2, max_context=16, head_dim=64)
    with pytest.raises(ValueError, match="14 positions in the KV cache plus 3 new token"):
        AttentionBlockJob(layout, layer=0, start=14, tokens=3, prefill=True)
    with pytest.raises(ValueError, match="a decode step takes one token, not 2"):
        AttentionBlockJob(layout, layer=0, start=0, tokens=2, prefill=False)
    block = AttentionBlock(ENGINE, DATAPATH, layout, hidden=256, heads=4, kv_heads=2, n_pe=4,
                           max_chunk=4)
    with pytest.raises(ValueError, match="a chunk of 5 tokens exceeds the block's max_chunk = 4"):
        block.job_payload(AttentionBlockJob(layout, layer=0, start=0, tokens=5, prefill=True))
    with pytest.raises(ValueError, match="heads \\(4\\) must be a multiple of kv_heads \\(3\\)"):
        AttentionBlock(ENGINE, DATAPATH, KvLayout(layers=1, kv_heads=3, max_context=16,
                                                  head_dim=64),
                       hidden=256, heads=4, kv_heads=3, n_pe=4, max_chunk=4)
