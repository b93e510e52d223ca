"""The small engine, datapath and DDR settings the DDR-fed block tests share (BitLinear, the
FFN block): one place, so that the two build the same hardware and share its Verilator build."""

from trilut.config import DatapathConfig, DdrSimConfig, EngineConfig

EPS = 1e-5

ENGINE = EngineConfig(group_size=3, tables_per_step=4, columns_per_cycle=4, accumulator_depth=16,
                      max_k=1024)
DATAPATH = DatapathConfig(ddr_word_bits=64, tile_beats=512, lanes=4, norm_eps=EPS)
SETTINGS = {
    "ddr-full-rate": DdrSimConfig(latency=20, beats_per_window=1, window=1),
    "ddr-half-rate": DdrSimConfig(latency=40, beats_per_window=1, window=2),
}
