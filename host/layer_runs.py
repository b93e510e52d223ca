"""Block-level runs a host asks of a transport: packing the streams, reading the results.

Each ``*_job`` function turns a piece of model work (a matmul, one of a model's linear layers
fed from DDR, a BitLinear layer, an FFN block) into a ``trilut.transport.BlockRequest`` (which
block, built how) and a ``StreamRun`` (DDR words, input beats, the level-2 model's expected
output beats), all from the numerics module and the weight image; ``run_job`` hands it to a
transport and unpacks what came back. Nothing here knows how the block is simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from trilut.config import DatapathConfig, DdrSimConfig, EngineConfig
from trilut.host.schedule import ddr_depth_for, weight_feed
from trilut.host.weight_image import WeightImage
from trilut.models import numerics as nm
from trilut.transport import BlockRequest, PhaseResult, StreamPhase, StreamRun, Transport

__all__ = ["TlmmCase", "BlockJob", "tlmm_job", "layer_from_ddr_job", "bitlinear_job",
           "ffn_layers", "ffn_job", "qkv_layers", "qkv_level2", "qkv_job", "run_job", "with_expected_cycles"]

#: DDR error and AXI4-rule flags every DDR-fed run must leave at zero.
_DDR_FLAGS = ("violations", "error", "r_stalled")


@dataclass(frozen=True)
class TlmmCase:
    name: str
    acts: np.ndarray          # int8 values [M, K]
    weights: np.ndarray       # ternary [N, K]
    stall: float = 0.0        # probability of an idle/backpressure cycle on every stream
    seed: int = 0


@dataclass(frozen=True)
class BlockJob:
    """A request and its run, with what the host needs to read the results back."""
    request: BlockRequest
    run: StreamRun
    expected: list[np.ndarray]            # the level-2 result of every phase
    output: str                           # the output stream the results come on
    unpack: object                        # (phase index, beats) -> array
    weight_words: int = 0                 # DDR words of weights read (DDR-fed blocks)
    info: dict = field(default_factory=dict)


def with_expected_cycles(job: BlockJob, cycles: list[int | None]) -> BlockJob:
    """``job`` with each phase's stall-free cycle count to assert (from the block's
    ``expected_cycles``, which the host does not know)."""
    phases = [replace(p, expected_cycles=c) for p, c in zip(job.run.phases, cycles, strict=True)]
    return replace(job, run=replace(job.run, phases=phases))


def run_job(transport: Transport, job: BlockJob) -> tuple[list[np.ndarray], list[PhaseResult]]:
    """Run ``job``; return each phase's unpacked results and the raw phase results."""
    results = transport.run_stream(job.request, job.run)
    arrays = [job.unpack(i, r.outputs[job.output]) for i, r in enumerate(results)]
    return arrays, results


def _ddr_params(ddr: DdrSimConfig, depth: int) -> dict:
    return {"ddr": ddr, "ddr_depth": depth}


def _datapath(image: WeightImage, tile_beats: int, max_outstanding: "int | None", **kw
              ) -> DatapathConfig:
    """The datapath configuration a request builds its block from: the image's DDR word
    width, the engine's lanes, the run's tile depth (and bursts in flight, norm epsilon,
    activation when given); the other fields are ``DatapathConfig``'s."""
    if max_outstanding is not None:
        kw["max_outstanding"] = max_outstanding
    return DatapathConfig(ddr_word_bits=image.ddr_word_bits, tile_beats=tile_beats,
                          lanes=image.engine.columns_per_cycle, **kw)


# --- the TLMM engine alone --------------------------------------------------------------------

def tlmm_job(cfg: EngineConfig, cases: list[TlmmCase]) -> BlockJob:
    """Every case a phase of one run on one build of the engine for ``cfg``."""
    T, C, D = cfg.tables_per_step, cfg.columns_per_cycle, cfg.accumulator_depth
    phases, expected = [], []
    for case in cases:
        m, k = case.acts.shape
        n = case.weights.shape[0]
        cfg.check_shape(k, n)
        exact = nm.ternary_matmul(case.acts, case.weights)
        expected.append(exact)
        phases.append(StreamPhase(
            name=case.name, stall=case.stall, seed=case.seed,
            scalars={"k_blocks": cfg.padded_k(k) // cfg.block_k,
                     "n_groups": cfg.padded_n(n) // C},
            # The engine re-reads the weights for every activation row.
            inputs={"weights": nm.tlmm_weight_beats(case.weights, cfg.code, T, C, D) * m,
                    "acts": nm.tlmm_act_beats(case.acts, cfg.code, T, C, D, n)},
            expected={"results": nm.tlmm_result_beats(exact, C, cfg.acc_width)}))

    def unpack(i, beats):
        m, n = expected[i].shape
        return nm.tlmm_unpack_results(beats, m, n, C, cfg.acc_width)
    return BlockJob(BlockRequest("tlmm_engine", {"engine": cfg}), StreamRun(phases),
                    expected, "results", unpack)


# --- one ternary linear fed from DDR ----------------------------------------------------------

def layer_from_ddr_job(image: WeightImage, layer: str, acts: np.ndarray, *, tile_beats: int,
                       ddr: DdrSimConfig, ddr_depth: int = 8192, stall: float = 0.0,
                       seed: int = 1, max_outstanding: "int | None" = None) -> BlockJob:
    """``acts``: int8 ``[M, K]``; the weights come from the image, placed in the DDR."""
    cfg = image.engine
    values = image.layer_values(layer)
    n, k = values.shape
    m = acts.shape[0]
    cfg.check_shape(k, n)
    T, C, D = cfg.tables_per_step, cfg.columns_per_cycle, cfg.accumulator_depth
    feed = weight_feed(image, layer, m, tile_beats=tile_beats, ddr_depth=ddr_depth)
    exact = nm.ternary_matmul(acts, values)
    phase = StreamPhase(
        name=layer, stall=stall, seed=seed,
        scalars={"k_blocks": feed.k_blocks, "n_groups": feed.n_groups},
        inputs={"cmd": feed.cmd, "tiles": feed.tiles,
                "acts": nm.tlmm_act_beats(acts, cfg.code, T, C, D, n)},
        expected={"results": nm.tlmm_result_beats(exact, C, cfg.acc_width)})
    request = BlockRequest("weight_fed_tlmm", {
        "engine": cfg, "datapath": _datapath(image, tile_beats, max_outstanding),
        **_ddr_params(ddr, ddr_depth)})
    return BlockJob(request, StreamRun([phase], memory=feed.memory, clean_flags=_DDR_FLAGS),
                    [exact], "results",
                    lambda i, beats: nm.tlmm_unpack_results(beats, m, n, C, cfg.acc_width),
                    weight_words=feed.words_read, info={"tiles": len(feed.schedule)})


# --- a BitLinear layer: norm -> quantize -> TLMM from DDR -> dequantize -----------------------

def _norm_codes(image: WeightImage, name: str) -> np.ndarray:
    return np.asarray(image.norm(name)).astype(np.float16).view(np.uint16)


def _fp32_code(value: float) -> int:
    return int(nm.fp32_from_float(np.float64(value)))


def bitlinear_job(image: WeightImage, layer: str, norm: str, x: np.ndarray, *,
                  tile_beats: int, ddr: DdrSimConfig, eps: float, ddr_depth: int = 8192,
                  stall: float = 0.0, seed: int = 1,
                  max_outstanding: "int | None" = None) -> BlockJob:
    """``x``: fp16 codes ``[M, K]`` entering the layer's norm ``norm`` (an image norm name)."""
    cfg = image.engine
    lanes = cfg.columns_per_cycle
    values = image.layer_values(layer)
    n, k = values.shape
    m = x.shape[0]
    scale = float(image.scale(layer))
    norm_w = _norm_codes(image, norm)
    expected = nm.fp16_bitlinear(x, norm_w, values, scale, eps=eps, lanes=lanes)
    feed = weight_feed(image, layer, m, tile_beats=tile_beats, ddr_depth=ddr_depth)
    block_k = cfg.block_k
    phase = StreamPhase(
        name=layer, stall=stall, seed=seed,
        scalars={"k": k, "k_blocks": feed.k_blocks, "n_groups": feed.n_groups,
                 "tiles_per_row": cfg.output_tiles(n),
                 "weight_scale": _fp32_code(scale)},
        inputs={"cmd": feed.cmd, "tiles": feed.tiles, "x": nm.lane_beats(x, lanes),
                "norm_weight": nm.lane_beats(np.tile(norm_w, (m, 1)), lanes)},
        expected={"y": nm.lane_beats(expected, lanes)})
    request = BlockRequest("bitlinear", {
        "engine": cfg, "max_k": -(-k // block_k) * block_k,
        "datapath": _datapath(image, tile_beats, max_outstanding, norm_eps=eps),
        **_ddr_params(ddr, ddr_depth)})
    return BlockJob(request, StreamRun([phase], memory=feed.memory, clean_flags=_DDR_FLAGS),
                    [expected], "y", lambda i, beats: nm.unpack_lane_beats(beats, m, n, lanes),
                    weight_words=feed.words_read)


# --- the FFN block ------------------------------------------------------------------------------

def ffn_layers(layer: int = 0) -> dict[str, str]:
    """The image names of decoder layer ``layer``'s FFN tensors."""
    p = f"layers.{layer}"
    return {"gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj",
            "down": f"{p}.mlp.down_proj", "norm": f"{p}.post_attention_layernorm",
            "sub_norm": f"{p}.mlp.ffn_sub_norm"}


def ffn_level2(image: WeightImage, h: np.ndarray, *, activation: str, eps: float,
               layer: int = 0) -> np.ndarray:
    """The FFN block's level-2 result with the image's weights, norms and scales."""
    names = ffn_layers(layer)
    return nm.fp16_ffn(
        h, _norm_codes(image, names["norm"]), _norm_codes(image, names["sub_norm"]),
        *(image.layer_values(names[k]) for k in ("gate", "up", "down")),
        tuple(float(image.scale(names[k])) for k in ("gate", "up", "down")),
        activation=activation, eps=eps, lanes=image.engine.columns_per_cycle)


def ffn_job(image: WeightImage, h: np.ndarray, *, activation: str, tile_beats: int,
            ddr: DdrSimConfig, eps: float, layer: int = 0, stall: float = 0.0,
            seed: int = 1, max_outstanding: "int | None" = None) -> BlockJob:
    """``h``: fp16 codes ``[M, hidden]``, the residual stream entering the FFN."""
    cfg = image.engine
    lanes = cfg.columns_per_cycle
    names = ffn_layers(layer)
    ffn, hidden = image.layer_values(names["gate"]).shape
    m = h.shape[0]
    depth = ddr_depth_for(image, [names[k] for k in ("gate", "up", "down")])
    expected = ffn_level2(image, h, activation=activation, eps=eps, layer=layer)
    feeds = [weight_feed(image, names[k], 1, tile_beats=tile_beats, ddr_depth=depth)
             for k in ("gate", "up", "down")]
    memory = {a: w for f in feeds for a, w in f.memory.items()}
    norm_w, sub_w = _norm_codes(image, names["norm"]), _norm_codes(image, names["sub_norm"])
    phase = StreamPhase(
        name=f"layers.{layer}.mlp", stall=stall, seed=seed,
        scalars={f"{k}_scale": _fp32_code(image.scale(names[k])) for k in ("gate", "up", "down")},
        # Per row: gate, up, down, each streamed from DDR.
        inputs={"cmd": [c for _ in range(m) for f in feeds for c in f.cmd],
                "tiles": [t for _ in range(m) for f in feeds for t in f.tiles],
                "h": nm.lane_beats(h, lanes),
                "norm_weight": nm.lane_beats(np.tile(norm_w, (m, 1)), lanes),
                "sub_norm_weight": nm.lane_beats(np.tile(sub_w, (m, 1)), lanes)},
        expected={"y": nm.lane_beats(expected, lanes)})
    request = BlockRequest("ffn_block", {
        "engine": cfg, "hidden": hidden, "ffn": ffn,
        "datapath": _datapath(image, tile_beats, max_outstanding, norm_eps=eps,
                              activation=activation),
        **_ddr_params(ddr, depth)})
    return BlockJob(request, StreamRun([phase], memory=memory, clean_flags=_DDR_FLAGS),
                    [expected], "y",
                    lambda i, beats: nm.unpack_lane_beats(beats, m, hidden, lanes),
                    weight_words=m * sum(f.words_read for f in feeds))


# --- the Q/K/V projection block -----------------------------------------------------------------

def qkv_layers(layer: int = 0) -> dict[str, str]:
    """The image names of decoder layer ``layer``'s Q/K/V projection tensors."""
    p = f"layers.{layer}"
    return {"q": f"{p}.self_attn.q_proj", "k": f"{p}.self_attn.k_proj",
            "v": f"{p}.self_attn.v_proj", "norm": f"{p}.input_layernorm"}


def qkv_level2(image: WeightImage, h: np.ndarray, *, eps: float, layer: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Q/K/V block's level-2 ``(q, k, v)`` with the image's weights, norm and scales
    (q and k rows in the image's RoPE pair order)."""
    names = qkv_layers(layer)
    return nm.fp16_qkv(h, _norm_codes(image, names["norm"]),
                       *(image.layer_values(names[k]) for k in "qkv"),
                       tuple(float(image.scale(names[k])) for k in "qkv"),
                       eps=eps, lanes=image.engine.columns_per_cycle)


def qkv_job(image: WeightImage, h: np.ndarray, *, tile_beats: int, ddr: DdrSimConfig,
            eps: float, layer: int = 0, stall: float = 0.0, seed: int = 1,
            max_outstanding: "int | None" = None) -> BlockJob:
    """``h``: fp16 codes ``[M, hidden]``, the residual stream entering the attention half;
    the result per row is q | k | v (``unpack`` gives ``[M, q_out + 2 kv_out]``)."""
    cfg = image.engine
    lanes = cfg.columns_per_cycle
    names = qkv_layers(layer)
    q_out, hidden = image.layer_values(names["q"]).shape
    kv_out = image.layer_values(names["k"]).shape[0]
    m = h.shape[0]
    depth = ddr_depth_for(image, [names[k] for k in "qkv"])
    expected = np.concatenate(qkv_level2(image, h, eps=eps, layer=layer), axis=1)
    feeds = [weight_feed(image, names[k], 1, tile_beats=tile_beats, ddr_depth=depth)
             for k in "qkv"]
    memory = {a: w for f in feeds for a, w in f.memory.items()}
    norm_w = _norm_codes(image, names["norm"])
    n = q_out + 2 * kv_out
    phase = StreamPhase(
        name=f"layers.{layer}.self_attn.qkv", stall=stall, seed=seed,
        scalars={f"{k}_scale": _fp32_code(image.scale(names[k])) for k in "qkv"},
        # Per row: q, k, v, each streamed from DDR.
        inputs={"cmd": [c for _ in range(m) for f in feeds for c in f.cmd],
                "tiles": [t for _ in range(m) for f in feeds for t in f.tiles],
                "h": nm.lane_beats(h, lanes),
                "norm_weight": nm.lane_beats(np.tile(norm_w, (m, 1)), lanes)},
        expected={"y": nm.lane_beats(expected, lanes)})
    request = BlockRequest("qkv_block", {
        "engine": cfg, "hidden": hidden, "q_out": q_out, "kv_out": kv_out,
        "datapath": _datapath(image, tile_beats, max_outstanding, norm_eps=eps),
        **_ddr_params(ddr, depth)})
    return BlockJob(request, StreamRun([phase], memory=memory, clean_flags=_DDR_FLAGS),
                    [expected], "y", lambda i, beats: nm.unpack_lane_beats(beats, m, n, lanes),
                    weight_words=m * sum(f.words_read for f in feeds))
