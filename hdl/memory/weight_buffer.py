"""The double-buffered (ping-pong) weight buffer between DDR and the TLMM engine.

Weight beats (``C x T`` table indices, ``EngineConfig.weight_beat_bits`` bits, 2240 for the
kv260) arrive from DDR as narrower words, are reassembled and written into one of two banks
while the engine streams the other bank, once per activation row that reuses the tile.
The banks are portable ``amaranth.lib.memory.Memory`` with no initial contents, so that yosys
``synth_xilinx -uram`` infers URAM288: ``ceil(beat_bits / 72)`` URAM288 side by side per bank
(cascaded ``ceil(tile_beats / 4096)`` deep), or RAMB36E2 on boards without URAM. With
``one_memory=True`` both banks are the two halves of one memory, so ``tile_beats <= 2048``
puts both in a single URAM288 depth: half the URAM. See ``docs/weight_buffer.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

# The block-memory count is the config's (one count for the fit check and this block);
# BRAM36_SHAPES is re-exported for callers that imported it from here.
from trilut.config import (BRAM36_SHAPES, MAX_REPLAYS, BoardConfig, EngineConfig,
                           uram_cascade, uram_columns, weight_buffer_blocks,
                           weight_buffer_depth)
# The engine's weight-beat layout, so that ``wiring.connect(m, buffer.beats, engine.weights)``
# accepts the pair: one definition of the beat's field order.
from trilut.hdl.linear.tlmm_engine import weight_beat_layout
from trilut.models.checks import positive_int

__all__ = ["WeightBuffer", "WeightBufferJob", "WeightBufferTiming", "BRAM36_SHAPES"]


@dataclass(frozen=True)
class WeightBufferJob:
    """The tile commands ``(length, replays)`` :class:`WeightBuffer` takes, in order, its
    commands and words always offered and its beats always taken."""

    tiles: tuple[tuple[int, int], ...]

    def __post_init__(self):
        object.__setattr__(self, "tiles", tuple(tuple(t) for t in self.tiles))


class WeightBuffer(wiring.Component):
    """Two banks of ``tile_beats`` weight beats: one fills from DDR while the other streams.

    Streams (``amaranth.lib.stream``: a beat moves on a clock edge where valid and ready are
    both high; valid and payload hold until then):

    * ``tiles`` in: one command per tile, ``{length, replays}`` (``length`` in the low bits;
      :meth:`command` packs it). ``length`` beats, ``1 <= length <= tile_beats``, are loaded
      once and streamed ``replays`` times, ``1 <= replays <= max_replays`` (the engine reads the
      same weights for every activation row). Other values are not checked by the hardware.
    * ``fill`` in: ``word_bits``-wide DDR words, ``words_per_beat = ceil(beat_bits/word_bits)``
      per beat, word 0 holding the beat's least significant bits; bits above ``beat_bits`` in
      the last word are ignored (:meth:`image_words` builds the stream). A tile's command is
      taken before its first word, so ``fill`` carries exactly ``length * words_per_beat``
      words per command, tiles back to back.
    * ``beats`` out: the engine's weight beats (``TlmmEngine.weights`` layout), each tile's
      ``length`` beats in address order, ``replays`` times over, tiles in command order.

    ``one_memory``: the two banks are one memory, the bank being the top address bit
    (URAM288 is dual-ported: the fill side writes on one port, the engine reads on the other).
    Same protocol and timing; no read-data multiplexer; with ``tile_beats <= 2048`` half the
    URAM288 of two separate banks.

    Banks alternate, tile ``i`` in bank ``i % 2``. The fill side takes a command when its bank
    is empty, then one word per cycle; after the tile's last word the bank is full. The stream
    side reads a full bank ``length * replays`` times and then frees it. So a tile streams
    while the next one fills, and the banks swap when both "this bank drained (every replay
    out)" and "the other bank full" hold: the fill side is at most one tile ahead.

    Throughput and latency: one beat per cycle on ``beats`` whenever a bank is full and the
    engine is ready, across bank swaps too (no bubble between tiles). ``fill`` takes one word
    per cycle while loading, plus one cycle per tile for the command. A tile's first beat
    is offered 3 cycles after its last word was taken (read issued, read data, output
    register) when the stream side is idle. The bank read port's data register (held when
    its enable is low, as URAM's is) and a two-beat skid queue (output register + skid
    register) make every memory read decision depend on registers only: ``beats.ready``
    reaches the queue's registers, not the memories' enables, which span many URAM columns.
    ``tiles.ready`` and ``fill.ready`` are registered too.
    """

    def __init__(self, cfg: EngineConfig, *, tile_beats: int, word_bits: int,
                 max_replays: int = MAX_REPLAYS, one_memory: bool = False):
        if not isinstance(cfg, EngineConfig):
            raise TypeError(f"cfg must be an EngineConfig, not {cfg!r}")
        positive_int("tile_beats", tile_beats)
        positive_int("word_bits", word_bits)
        positive_int("max_replays", max_replays)
        if not isinstance(one_memory, bool):
            raise ValueError(f"one_memory must be True or False, not {one_memory!r}")
        self.cfg = cfg
        self.tile_beats = tile_beats
        self.word_bits = word_bits
        self.max_replays = max_replays
        self.one_memory = one_memory
        self.beat_bits = cfg.weight_beat_bits
        self.words_per_beat = -(-self.beat_bits // word_bits)
        self.addr_width = max(1, ceil_log2(tile_beats))
        self.command_layout = data.StructLayout({
            "length": unsigned(tile_beats.bit_length()),
            "replays": unsigned(max_replays.bit_length()),
        })
        super().__init__({
            "tiles": In(stream.Signature(self.command_layout)),
            "fill": In(stream.Signature(word_bits)),
            "beats": Out(stream.Signature(weight_beat_layout(cfg))),
        })

    # ---- how it is built -------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        wpb = self.words_per_beat
        aw = self.addr_width
        rw = self.command_layout["replays"].shape.width

        # No init contents: URAM288 cannot be preloaded, and yosys maps a memory to URAM only
        # when its initial value is all zero (docs/resources.md). Reads and writes never meet
        # in one bank (a bank is either filling or streaming): no read transparency needed.
        # (Ports are bound to plain names: a port built inside an expression gets the
        # placeholder name ``$signature__addr``.)
        if self.one_memory:
            # Bank b at addresses b * 2**aw + (0 .. tile_beats-1): the bank is the top address
            # bit, so the two banks share every URAM column (port A writes, port B reads).
            m.submodules.banks = shared = Memory(shape=unsigned(self.beat_bits),
                                                 depth=self.memory_depth, init=[])
            write = shared.write_port()
            read = shared.read_port()
        else:
            m.submodules.bank0 = bank0 = Memory(shape=unsigned(self.beat_bits),
                                                depth=self.tile_beats, init=[])
            m.submodules.bank1 = bank1 = Memory(shape=unsigned(self.beat_bits),
                                                depth=self.tile_beats, init=[])
            write0 = bank0.write_port()
            read0 = bank0.read_port()
            write1 = bank1.write_port()
            read1 = bank1.read_port()

        # Per bank: full flag, last address (length - 1) and last replay (replays - 1).
        full = Signal(2)
        last_addr = [Signal(aw, name=f"last_addr{b}") for b in range(2)]
        last_replay = [Signal(rw, name=f"last_replay{b}") for b in range(2)]

        # ---- fill side: command, then length * words_per_beat words ----------------------
        fill_bank = Signal()
        loading = Signal()
        word = Signal(range(max(wpb, 2)))
        waddr = Signal(aw)
        # Words 0 .. wpb-2 of the beat being assembled, shifted in from the top: after wpb-1
        # words word 0 sits lowest, which is the DDR image's order. A shift needs no decoder.
        partial_bits = (wpb - 1) * self.word_bits
        partial = Signal(max(partial_bits, 1))

        m.d.comb += [
            self.tiles.ready.eq(~loading & ~full.bit_select(fill_bank, 1)),
            self.fill.ready.eq(loading),
        ]
        take_command = self.tiles.valid & self.tiles.ready
        take_word = self.fill.valid & self.fill.ready
        last_word = (word == wpb - 1) if wpb > 1 else 1
        beat_data = Cat(partial[:partial_bits], self.fill.payload) if wpb > 1 else self.fill.payload

        with m.If(take_command):
            m.d.sync += [loading.eq(1), word.eq(0), waddr.eq(0)]
            for b in range(2):
                with m.If(fill_bank == b):
                    m.d.sync += [last_addr[b].eq(self.tiles.payload.length - 1),
                                 last_replay[b].eq(self.tiles.payload.replays - 1)]
        write_beat = take_word & last_word
        if self.one_memory:
            m.d.comb += [write.addr.eq(Cat(waddr, fill_bank)),
                         write.data.eq(beat_data[:self.beat_bits]), write.en.eq(write_beat)]
        else:
            for b, wr in enumerate((write0, write1)):
                m.d.comb += [wr.addr.eq(waddr), wr.data.eq(beat_data[:self.beat_bits]),
                             wr.en.eq(write_beat & (fill_bank == b))]
        tile_loaded = Signal()
        m.d.comb += tile_loaded.eq(take_word & last_word &
                                   (waddr == Mux(fill_bank, last_addr[1], last_addr[0])))
        with m.If(take_word):
            if wpb > 1:
                m.d.sync += partial.eq(Cat(partial[self.word_bits:], self.fill.payload))
            with m.If(last_word):
                m.d.sync += [word.eq(0), waddr.eq(waddr + 1)]
            with m.Else():
                m.d.sync += word.eq(word + 1)
        with m.If(tile_loaded):
            m.d.sync += [loading.eq(0), fill_bank.eq(~fill_bank)]
        set_full = Mux(tile_loaded, Mux(fill_bank, 0b10, 0b01), 0)

        # ---- stream side: read issue, read data (A), two-beat skid queue -----------------
        read_bank = Signal()
        raddr = Signal(aw)
        replay = Signal(rw)
        a_valid = Signal()          # the read port's data register holds a beat
        a_bank = Signal()           # ... read from this bank
        head_valid = Signal()
        head = Signal(self.beat_bits)
        skid_valid = Signal()
        skid = Signal(self.beat_bits)

        # Every condition below is a register: the memory enables never wait on beats.ready.
        a_move = a_valid & ~skid_valid
        issue = Signal()
        m.d.comb += issue.eq(full.bit_select(read_bank, 1) & (~a_valid | a_move))
        if self.one_memory:
            m.d.comb += [read.addr.eq(Cat(raddr, read_bank)), read.en.eq(issue)]
        else:
            for b, rd in enumerate((read0, read1)):
                m.d.comb += [rd.addr.eq(raddr), rd.en.eq(issue & (read_bank == b))]

        clear_full = Signal(2)
        with m.If(issue):
            with m.If(raddr == Mux(read_bank, last_addr[1], last_addr[0])):
                m.d.sync += raddr.eq(0)
                with m.If(replay == Mux(read_bank, last_replay[1], last_replay[0])):
                    m.d.sync += [replay.eq(0), read_bank.eq(~read_bank)]
                    m.d.comb += clear_full.eq(Mux(read_bank, 0b10, 0b01))
                with m.Else():
                    m.d.sync += replay.eq(replay + 1)
            with m.Else():
                m.d.sync += raddr.eq(raddr + 1)
        # A bank fills only while empty and streams only while full: set and clear never meet.
        m.d.sync += full.eq((full | set_full) & ~clear_full)

        with m.If(~a_valid | a_move):
            m.d.sync += [a_valid.eq(issue), a_bank.eq(read_bank)]
        if self.one_memory:
            a_data = read.data
        else:
            a_data = Mux(a_bank, read1.data, read0.data)

        # A beat moves from A only while the skid register is empty, so the queue (head, skid)
        # never overflows; ``pop`` (the only use of beats.ready) just shifts it.
        pop = head_valid & self.beats.ready
        with m.If(pop | ~head_valid):
            with m.If(skid_valid):
                m.d.sync += [head.eq(skid), head_valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [head.eq(a_data), head_valid.eq(a_move)]
        with m.Elif(a_move):
            m.d.sync += [skid.eq(a_data), skid_valid.eq(1)]

        m.d.comb += [self.beats.valid.eq(head_valid), self.beats.payload.eq(head)]
        return m

    # ---- host side: the DDR image and the command word ---------------------------------------

    def command(self, length: int, replays: int = 1) -> int:
        """The ``tiles`` payload for one tile, as an int; checks the ranges the RTL assumes."""
        self._check_tile(length, replays)
        offset = self.command_layout["replays"].offset
        return length | (replays << offset)

    def image_words(self, beats: Sequence[int]) -> list[int]:
        """Weight beats -> the DDR words that ``fill`` carries: each beat padded with zeros to
        ``words_per_beat`` words, word 0 holding its least significant bits."""
        mask = (1 << self.word_bits) - 1
        words = []
        for i, beat in enumerate(beats):
            if not isinstance(beat, int) or beat < 0 or beat >> self.beat_bits:
                raise ValueError(f"beat {i} must be an int in [0, 2**{self.beat_bits}), "
                                 f"not {beat!r}")
            words += [(beat >> (j * self.word_bits)) & mask for j in range(self.words_per_beat)]
        return words

    def _check_tile(self, length, replays) -> None:
        if not isinstance(length, int) or not 1 <= length <= self.tile_beats:
            raise ValueError(f"tile length must be an integer in 1..{self.tile_beats} "
                             f"(tile_beats), not {length!r}")
        if not isinstance(replays, int) or not 1 <= replays <= self.max_replays:
            raise ValueError(f"tile replays must be an integer in 1..{self.max_replays} "
                             f"(max_replays), not {replays!r}")

    # ---- what it computes, what it takes in time ---------------------------------------------

    def model(self, words: Sequence[int], tiles: Sequence[tuple[int, int]]) -> list[int]:
        """Bit-exact model: the ``beats`` sequence for ``fill`` words ``words`` and ``tiles``
        commands ``(length, replays)``. Padding bits of each beat's last word are dropped."""
        for length, replays in tiles:
            self._check_tile(length, replays)
        need = sum(length for length, _ in tiles) * self.words_per_beat
        if len(words) != need:
            raise ValueError(f"the tiles need {need} fill words "
                             f"({self.words_per_beat} per beat), not {len(words)}")
        beat_mask = (1 << self.beat_bits) - 1
        out, at = [], 0
        for length, replays in tiles:
            tile = []
            for _ in range(length):
                beat = 0
                for j in range(self.words_per_beat):
                    beat |= words[at + j] << (j * self.word_bits)
                at += self.words_per_beat
                tile.append(beat & beat_mask)
            out += tile * replays
        return out

    def expected_cycles(self, job: WeightBufferJob) -> int:
        """Cycles from the first command taken to the last beat out, inclusive, when commands
        and words are always offered and beats always taken.

        With ``fill_i = 1 + length_i * words_per_beat`` (command + words) and
        ``stream_i = length_i * replays_i``: tile ``i+1``'s command is taken in the cycle tile
        ``i`` starts streaming (its bank, tile ``i-1``'s, is free by then), so tile ``i+1``
        starts streaming ``max(fill_{i+1}, stream_i)`` cycles after tile ``i`` did, and a beat
        leaves 2 cycles after its read::

            fill_0 + sum(max(fill_{i+1}, stream_i) for i in 0..n-2) + stream_{n-1} + 2

        Filling is hidden behind streaming whenever ``replays >= words_per_beat`` (+1 cycle).
        :class:`WeightBufferTiming` is the same timing beat by beat, for a parent whose words
        and beats come and go at their own pace.
        """
        tiles = job.tiles
        for length, replays in tiles:
            self._check_tile(length, replays)
        if not tiles:
            return 0
        fill = [1 + length * self.words_per_beat for length, _ in tiles]
        stream = [length * replays for length, replays in tiles]
        return (fill[0] + sum(max(f, s) for f, s in zip(fill[1:], stream[:-1]))
                + stream[-1] + 2)

    def timing(self, tiles: Sequence[tuple[int, int]]) -> "WeightBufferTiming":
        """The per-beat event model of these tile commands (:class:`WeightBufferTiming`)."""
        return WeightBufferTiming(self, tiles)

    # ---- what it costs -----------------------------------------------------------------------

    @property
    def memory_depth(self) -> int:
        """Words per memory: ``tile_beats`` per bank, or with ``one_memory`` both banks in one
        memory, bank 1 from address ``2**addr_width`` (``trilut.config.weight_buffer_depth``)."""
        return weight_buffer_depth(self.tile_beats, one_memory=self.one_memory)

    @property
    def memories(self) -> int:
        return 1 if self.one_memory else 2

    @property
    def uram_columns(self) -> int:
        """URAM288 side by side per memory: ``ceil(beat_bits / 72)``."""
        return uram_columns(self.beat_bits)

    @property
    def uram_cascade(self) -> int:
        """URAM288 cascaded in depth per column: ``ceil(memory_depth / 4096)``."""
        return uram_cascade(self.memory_depth)

    def memory_blocks(self, board: BoardConfig | None = None, *,
                      uram: bool | None = None) -> dict[str, int]:
        """Block memories for both banks: ``{"uram": n, "bram36": 0}`` or, with ``uram=False``
        or a ``board`` without URAM, ``{"uram": 0, "bram36": n}``.

        The count is ``trilut.config.weight_buffer_blocks``, the one the ``DesignConfig`` fit
        check uses. URAM: ``memories * uram_columns * uram_cascade``; with ``one_memory`` and
        ``tile_beats <= 2048`` half that of two banks (both in one URAM depth). BRAM36: the
        cheapest RAMB36E2 aspect ratio per memory (4096 x 9 for 4096-deep banks: 8 per 72
        bits, 8x the URAM count; 512 x 72 for 512-deep banks: the URAM count).
        """
        if uram is None:
            uram = board is None or board.resources.uram > 0
        return weight_buffer_blocks(self.cfg, tile_beats=self.tile_beats, uram=uram,
                                    one_memory=self.one_memory)


class WeightBufferTiming:
    """Per-beat event arithmetic of a :class:`WeightBuffer`, for a parent that offers the
    ``fill`` words and takes the ``beats`` at its own pace (the tile commands always offered,
    cycle 0 the first one taken). Tile by tile, in order: :meth:`command` (the cycle the
    tile's command is taken), then the parent takes its ``fill`` words no earlier than
    :meth:`word_ready` and reports the last one with :meth:`filled`; then, beat by beat,
    :meth:`beat_offered` and :meth:`beat_taken`. From the RTL, with ``f`` a word taken,
    ``i`` a bank read issued, ``m`` the read data moving on (into the output register or the
    skid register), ``o`` a beat first offered and ``p`` a beat taken:

    * command ``c_i >= f_last(i-1) + 1`` (one tile loads at a time) and, from the third
      tile, ``c_i >= i_last(i-2) + 1`` (its bank is the one tile ``i-2`` streamed from); its
      words from ``c_i + 1``; the bank is full on ``F_i = f_last(i) + 1``;
    * ``i_j = max(i_{j-1} + 1, m_{j-1}, F)``, ``m_j = max(i_j + 1, p_{j-2} + 1)`` (the skid
      register must be empty), ``o_j = max(m_j, p_{j-1}) + 1``.
    """

    def __init__(self, buffer: WeightBuffer, tiles: Sequence[tuple[int, int]]):
        self.tiles = [tuple(t) for t in tiles]
        for length, replays in self.tiles:
            buffer._check_tile(length, replays)
        self.buffer = buffer
        self.words_per_beat = buffer.words_per_beat
        self._commands = []
        self._last_word = []        # f_last per tile
        self._last_issue = []       # i_last per tile
        self._tile = -1             # the tile streaming
        self._left = 0              # its beats not yet offered
        self._i = self._m = None    # last read issue, last move out of the read register
        self._p = [None, None]      # the last two beats taken (p_{j-2}, p_{j-1})

    def command(self, i: int) -> int:
        """The cycle tile ``i``'s command is taken (tiles ``0 .. i-1`` filled, ``i-2``
        streamed)."""
        if i != len(self._commands) or i != len(self._last_word):
            raise ValueError(f"tile {i} commanded out of order")
        c = 0 if i == 0 else max(self._commands[-1] + 1, self._last_word[i - 1] + 1)
        if i >= 2:
            if len(self._last_issue) < i - 1:
                raise ValueError(f"tile {i} needs tile {i - 2} streamed first")
            c = max(c, self._last_issue[i - 2] + 1)
        self._commands.append(c)
        return c

    def word_ready(self) -> int:
        """The first cycle the current tile's words can be taken."""
        return self._commands[-1] + 1

    def words(self, i: int) -> int:
        return self.tiles[i][0] * self.words_per_beat

    def filled(self, i: int, last_word: int) -> None:
        """Tile ``i``'s last word was taken on ``last_word``."""
        self._last_word.append(last_word)

    def beats(self, i: int) -> int:
        length, replays = self.tiles[i]
        return length * replays

    def beat_offered(self) -> int:
        """The first cycle the next beat is offered on ``beats``."""
        if self._left == 0:
            self._tile += 1
            self._left = self.beats(self._tile)
            full = self._last_word[self._tile] + 1
        else:
            full = 0
        i = full if self._i is None else max(self._i + 1, self._m, full)
        m = i + 1 if self._p[0] is None else max(i + 1, self._p[0] + 1)
        self._i, self._m = i, m
        self._left -= 1
        if self._left == 0:
            self._last_issue.append(i)
        return max(m, self._p[1]) + 1 if self._p[1] is not None else m + 1

    def beat_taken(self, cycle: int) -> None:
        self._p = [self._p[1], cycle]
