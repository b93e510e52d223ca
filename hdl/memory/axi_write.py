"""AXI4 write channels and a streaming AXI4 write master (the accelerator's DDR writer).

The KV cache is written to DDR through this master (docs/memory.md). Signatures, member
directions as seen by the *master* (flip them for a slave), mirroring ``axi.py``'s read half:

* :class:`AxiWriteAddressSignature` (AW): ``awaddr``, ``awlen``, ``awsize``, ``awburst``,
  ``awvalid`` out; ``awready`` in; ``awid`` out when ``id_width > 0``.
* :class:`AxiWriteDataSignature` (W): ``wdata``, ``wstrb``, ``wlast``, ``wvalid`` out;
  ``wready`` in. (AXI4 has no ``wid``.)
* :class:`AxiWriteResponseSignature` (B), written from the slave's side: ``bresp``,
  ``bvalid`` (and ``bid``) out of the slave, ``bready`` into it.
* :class:`AxiWriteSignature`: ``aw: Out(AW)``, ``w: Out(W)``, ``b: In(B)``; the ports flatten
  to ``axi__aw__awaddr`` ... ``axi__b__bready``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from amaranth.hdl import Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.config import memory_blocks, sum_memory
from trilut.models.checks import int_in_range
from trilut.hdl.memory.axi import (AXI4_MAX_BURST, RESP_OKAY, BurstSplitter,
                                   address_channel_members, check_axi_widths,
                                   check_master_shape, split_bursts)

__all__ = ["AxiWriteAddressSignature", "AxiWriteDataSignature", "AxiWriteResponseSignature",
           "AxiWriteSignature", "AxiWriteMaster", "WriteJob"]


class AxiWriteAddressSignature(wiring.Signature):
    """AXI4 AW channel, master's view. ``awsize``: log2(bytes per beat); ``awlen``: beats - 1."""

    def __init__(self, *, addr_width: int, id_width: int = 0):
        super().__init__(address_channel_members("aw", addr_width=addr_width,
                                                 id_width=id_width))


class AxiWriteDataSignature(wiring.Signature):
    """AXI4 W channel, master's view: one ``wstrb`` bit per data byte."""

    def __init__(self, *, data_width: int):
        check_axi_widths(data_width=data_width)
        super().__init__({
            "wdata": Out(data_width),
            "wstrb": Out(data_width // 8),
            "wlast": Out(1),
            "wvalid": Out(1),
            "wready": In(1),
        })


class AxiWriteResponseSignature(wiring.Signature):
    """AXI4 B channel, slave's view (the slave drives ``bresp``; the master uses it flipped)."""

    def __init__(self, *, id_width: int = 0):
        check_axi_widths(id_width=id_width)
        members = {"bresp": Out(2), "bvalid": Out(1), "bready": In(1)}
        if id_width:
            members["bid"] = Out(id_width)
        super().__init__(members)


class AxiWriteSignature(wiring.Signature):
    """An AXI4 write port, master's view: ``aw`` and ``w`` out, ``b`` in."""

    def __init__(self, *, data_width: int, addr_width: int, id_width: int = 0):
        check_axi_widths(data_width=data_width, addr_width=addr_width, id_width=id_width)
        self.data_width = data_width
        self.addr_width = addr_width
        self.id_width = id_width
        super().__init__({
            "aw": Out(AxiWriteAddressSignature(addr_width=addr_width, id_width=id_width)),
            "w": Out(AxiWriteDataSignature(data_width=data_width)),
            "b": In(AxiWriteResponseSignature(id_width=id_width)),
        })


@dataclass(frozen=True)
class WriteJob:
    """What :meth:`AxiWriteMaster.expected_cycles` needs: the commands ``(byte address,
    words)`` in order, and the memory's write timing (``DdrModel``): W beats accepted at
    ``beats_per_window`` per ``window`` cycles, the B response ``b_latency`` cycles after a
    burst's last W beat."""

    commands: tuple[tuple[int, int], ...]
    beats_per_window: int
    window: int
    b_latency: int

    def __post_init__(self):
        commands = tuple((int(a), int(n)) for a, n in self.commands)
        object.__setattr__(self, "commands", commands)
        if not commands or any(n < 1 for _, n in commands):
            raise ValueError(f"a write job needs commands of at least one word each, "
                             f"not {commands!r}")
        int_in_range("window", self.window, 1)
        int_in_range("beats_per_window", self.beats_per_window, 1, self.window,
                     high_name="window")
        int_in_range("b_latency", self.b_latency, 1, why="cycles")


class AxiWriteMaster(wiring.Component):
    """Streams words into memory over AXI4: write commands and data words in, one
    completion per command out.

    Streams (``amaranth.lib.stream``):

    * ``cmd`` in: ``addr`` (byte address; the bits below one word are taken as zero) and
      ``length`` (words, at least 1; a command of length 0 is refused by :meth:`model` and
      answered in hardware as one that wrote nothing).
    * ``data`` in: the words to write, ``length`` of them per command, in command order.
    * ``done`` out: one beat per command, after the write response of its last burst;
      payload ``resp``, the worst (numerically largest) ``bresp`` of the command's bursts
      (0 = OKAY). A command is complete, its words visible to any later read, when its
      ``done`` beat leaves.

    AXI side (``axi``, :class:`AxiWriteSignature`): INCR bursts of full-width beats, all
    strobes set, fixed ID 0. Commands are split into bursts exactly as the read master splits
    them (:func:`trilut.hdl.memory.axi.split_bursts`: at most ``max_burst`` beats, never
    across 4 KiB). The AW for a burst is issued as soon as the splitter reaches it and at most
    ``max_outstanding`` bursts are waiting for their B; W beats follow the AWs in order, a
    beat moving when ``data`` offers it and the slave takes it. ``awvalid`` and the AW payload
    are registers; ``wvalid`` and ``wdata`` are ``data``'s (a combinational path from
    ``data`` to W; put a register slice in front of a long route); ``bready`` is always high.

    ``error`` goes high, and stays, after any B response other than OKAY; ``idle`` is high
    when no command is being split, no burst waits for data or a response and no ``done``
    beat is pending.
    """

    def __init__(self, *, data_width: int, addr_width: int, length_width: int = 24,
                 max_burst: int = AXI4_MAX_BURST, max_outstanding: int):
        check_axi_widths(data_width=data_width, addr_width=addr_width, id_width=0)
        check_master_shape(addr_width=addr_width, length_width=length_width,
                           max_burst=max_burst, max_outstanding=max_outstanding,
                           most_outstanding=64)
        self.data_width = data_width
        self.addr_width = addr_width
        self.length_width = length_width
        self.max_burst = max_burst
        self.max_outstanding = max_outstanding
        self.bytes_per_word = data_width // 8
        self.cmd_layout = data.StructLayout({
            "addr": unsigned(addr_width),
            "length": unsigned(length_width),
        })
        self.done_layout = data.StructLayout({"resp": unsigned(2)})
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout)),
            "data": In(stream.Signature(data_width)),
            "done": Out(stream.Signature(self.done_layout)),
            "axi": Out(AxiWriteSignature(data_width=data_width, addr_width=addr_width)),
            "error": Out(1),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        aw, w, b = self.axi.aw, self.axi.w, self.axi.b
        slots = self.max_outstanding

        # Bursts issued whose B has not come back; the W side's queue of burst lengths (and
        # whether each is its command's last) and the B side's queue of "last" marks.
        outstanding = Signal(range(slots + 1))
        m.submodules.w_queue = w_queue = fifo.SyncFIFOBuffered(width=9, depth=slots)
        m.submodules.b_queue = b_queue = fifo.SyncFIFOBuffered(width=1, depth=slots)
        # A zero-length command completes without a burst: it waits its turn behind the
        # bursts already issued (a "last" mark with no burst would reorder the completions,
        # so it is only taken when nothing is outstanding).
        empty_cmd = self.cmd.payload.length == 0
        split = BurstSplitter(m, self.cmd, aw, "aw", max_burst=self.max_burst,
                              bytes_per_word=self.bytes_per_word,
                              may_issue=lambda beats: (outstanding < slots)
                              & w_queue.w_rdy & b_queue.w_rdy,
                              cmd_hold=empty_cmd & (outstanding != 0))
        busy, issue, cmd_take = split.busy, split.issue, split.cmd_take
        m.d.comb += [w_queue.w_data.eq(split.beats - 1), w_queue.w_en.eq(issue),
                     b_queue.w_data.eq(split.last_burst), b_queue.w_en.eq(issue)]

        # ---- W: the data words, burst by burst --------------------------------------------
        beat = Signal(8)
        burst_last = beat == w_queue.r_data[:8]
        m.d.comb += [
            w.wdata.eq(self.data.payload),
            w.wstrb.eq(Const(-1, self.bytes_per_word)),
            w.wlast.eq(burst_last),
            w.wvalid.eq(self.data.valid & w_queue.r_rdy),
            self.data.ready.eq(w.wready & w_queue.r_rdy),
        ]
        w_take = w.wvalid & w.wready
        m.d.comb += w_queue.r_en.eq(w_take & burst_last)
        with m.If(w_take):
            m.d.sync += beat.eq(Mux(burst_last, 0, beat + 1))

        # ---- B: responses, folded per command into ``done`` --------------------------------
        worst = Signal(2)
        m.d.comb += b.bready.eq(~self.done.valid | self.done.ready)
        b_take = b.bvalid & b.bready
        resp = Mux(b.bresp > worst, b.bresp, worst)
        m.d.comb += b_queue.r_en.eq(b_take)
        with m.If(self.done.valid & self.done.ready):
            m.d.sync += self.done.valid.eq(0)
        with m.If(b_take):
            with m.If(b.bresp != RESP_OKAY):
                m.d.sync += self.error.eq(1)
            with m.If(b_queue.r_data[0]):
                m.d.sync += [self.done.valid.eq(1), self.done.payload.resp.eq(resp),
                             worst.eq(0)]
            with m.Else():
                m.d.sync += worst.eq(resp)
        with m.Elif(cmd_take & empty_cmd):
            m.d.sync += [self.done.valid.eq(1), self.done.payload.resp.eq(RESP_OKAY)]
        m.d.sync += outstanding.eq(outstanding + issue - b_take)
        m.d.comb += self.idle.eq(~busy & (outstanding == 0) & ~self.done.valid)
        return m

    # ---- what it computes, how long it takes --------------------------------------------------

    def bursts(self, addr: int, length: int) -> list[tuple[int, int]]:
        """The ``(awaddr, beats)`` bursts this master issues for one command."""
        return split_bursts(addr, length, bytes_per_beat=self.bytes_per_word,
                            max_burst=self.max_burst)

    def model(self, memory: Sequence[int], commands: Iterable[tuple[int, int]],
              words: Sequence[int]) -> list[int]:
        """Bit-exact model: ``memory`` (a list of words by word address) after the
        ``commands`` ``(byte address, length)`` wrote ``words`` in order."""
        memory = list(memory)
        words = list(words)
        at = 0
        for addr, length in commands:
            if length < 1:
                raise ValueError(f"a write command needs at least one word, not {length!r}")
            first = addr // self.bytes_per_word
            memory[first:first + length] = words[at:at + length]
            at += length
        if at != len(words):
            raise ValueError(f"{len(words)} data words for commands of {at} words")
        return memory

    def memory_blocks(self) -> dict[str, float]:
        """The two queues of ``max_outstanding`` entries (9 and 1 bits): LUT RAM up to 64
        (``trilut.config.memory_blocks``)."""
        return sum_memory(memory_blocks(9, self.max_outstanding - 1),
                          memory_blocks(1, self.max_outstanding - 1))

    def expected_cycles(self, job: WriteJob, *, word_offer=None) -> int:
        """Cycles from the first ``cmd`` beat taken to the last ``done`` beat out, inclusive,
        with ``cmd`` always offered from the first cycle, ``done`` never stalled, against
        ``DdrModel``'s write port. ``data`` is always offered, or, with ``word_offer``, word
        ``n`` from cycle ``word_offer(n, cycle word n - 1 left)`` on (``None`` for ``n = 0``;
        cycles from the first command taken): how a producer upstream paces the words.

        A per-burst recurrence: the AW of a burst leaves one cycle after the splitter reaches
        it (and after a burst slot frees), the slave takes the AW the cycle it is offered,
        the W beats of a burst move at the memory's write rate from the cycle after their AW
        is taken, and the B comes ``b_latency`` cycles after the last one; ``done`` follows
        the command's last B by one cycle.
        """
        b, win = job.beats_per_window, job.window
        bursts = []
        for addr, length in job.commands:
            split = self.bursts(addr, length)
            bursts += [(beats, k == len(split) - 1) for k, (_, beats) in enumerate(split)]
        # Token bucket of DdrModel (full at the start): beat n of a continuous run leaves on
        # cycle ceil((n * window + 1) / beats_per_window) - 1 after the first.
        tokens = win + b - 1
        cap = tokens
        split_free = 1              # first cycle the splitter holds the next burst
        w_free = 0                  # first cycle the W channel is free
        b_times = []
        done = 0
        last_token_cycle = 0
        word, departed = 0, None
        for j, (beats, last) in enumerate(bursts):
            issue = split_free
            if j >= self.max_outstanding:
                issue = max(issue, b_times[j - self.max_outstanding] + 1)
            aw_taken = issue + 1
            # The next command is taken as this one's last burst issues: one burst a cycle.
            split_free = issue + 1
            t = max(aw_taken + 1, w_free)
            for _ in range(beats):
                if word_offer is not None:
                    t = max(t, word_offer(word, departed))
                # refill the bucket up to cycle t
                tokens = min(cap, tokens + (t - last_token_cycle) * b)
                last_token_cycle = t
                while tokens < win:
                    t += 1
                    tokens = min(cap, tokens + b)
                    last_token_cycle = t
                tokens -= win
                t_last = departed = t
                word += 1
                t += 1
            w_free = t
            b_times.append(t_last + job.b_latency)
            if last:
                done = b_times[-1] + 1
        return done + 1
