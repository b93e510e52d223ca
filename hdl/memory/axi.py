"""AXI4 read channels and a streaming AXI4 read master (the accelerator's DDR reader).

Only the read half of AXI4 is here: the accelerator streams weights and KV-cache blocks out of
DDR. The write half (KV cache, results) gets its own master when it is needed.

Signatures (member directions as seen by the *master*; flip them for a slave):

* :class:`AxiReadAddressSignature` (AR): ``araddr``, ``arlen``, ``arsize``, ``arburst``,
  ``arvalid`` out; ``arready`` in; ``arid`` out when ``id_width > 0``.
* :class:`AxiReadDataSignature` (R), written from the slave's side and used flipped by the
  master: ``rdata``, ``rresp``, ``rlast``, ``rvalid`` (and ``rid``) out of the slave,
  ``rready`` into it.
* :class:`AxiReadSignature`: ``ar: Out(AR)`` and ``r: In(R)``, so the master's ports flatten
  to ``axi__ar__araddr`` ... ``axi__r__rready``.

Widths: the master's data width and bursts in flight have no default; they come from the
configuration (``DatapathConfig.ddr_word_bits``, ``max_outstanding``; kv260: 128 bits, the
width of a ZynqMP S_AXI_HP port in its widest mode and what the PS DDR controller serves per
port). Addresses default to 40 bits. 40 bits is the ZynqMP's physical
address map (1 TB): the KV260's 4 GB of DDR4 sits in two windows, 2 GB at ``0x0`` and 2 GB at
``0x8_0000_0000``, and the upper one needs 36 bits, so 32-bit addresses could reach only half of
the memory. The HP ports are 49 bits wide; the bits above 40 tie to zero in the block design.
The 8 extra bits over 32 cost nothing measurable (one address register and adder).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from amaranth.hdl import Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from trilut.config import AXI_ADDR_WIDTH, DdrSimConfig, memory_blocks
from trilut.models.checks import int_in_range, power_of_two

__all__ = [
    "BURST_INCR", "RESP_OKAY", "PAGE_BYTES",
    "AxiReadAddressSignature", "AxiReadDataSignature", "AxiReadSignature",
    "AxiReadMaster", "AxiReadTiming", "ReadJob", "BurstSplitter", "check_axi_widths",
    "check_master_shape", "split_bursts", "address_channel_members",
]

#: ``arburst`` encoding of an incrementing burst (AXI4 A3.4.1).
BURST_INCR = 0b01
#: ``rresp`` OKAY; 0b10 is SLVERR and 0b11 DECERR.
RESP_OKAY = 0b00
#: AXI4 rule (A3.4.1): no burst may cross a 4 KiB address boundary.
PAGE_BYTES = 4096
#: AXI4 INCR bursts are 1..256 beats (``arlen`` is 8 bits: beats - 1).
AXI4_MAX_BURST = 256


def check_axi_widths(*, data_width=None, addr_width=None, id_width=None) -> None:
    """Refuse widths that AXI4 (or this implementation) does not allow, quoting the value;
    only the widths given are checked (a channel signature has only some of them)."""
    if data_width is not None:
        power_of_two("data_width", data_width, 8, 1024, why="bits, AXI4")
    if addr_width is not None:
        int_in_range("addr_width", addr_width, 12, 64)
    if id_width is not None:
        int_in_range("id_width", id_width, 0, 16)


def check_master_shape(*, addr_width: int, length_width: int, max_burst: int,
                       max_outstanding: int, most_outstanding: int | None = None) -> None:
    """The command and burst parameters both masters share, checked alike."""
    int_in_range("length_width", length_width, 1, addr_width, high_name="addr_width")
    int_in_range("max_burst", max_burst, 1, AXI4_MAX_BURST, why="AXI4 INCR")
    int_in_range("max_outstanding", max_outstanding, 1, most_outstanding)


def address_channel_members(prefix: str, *, addr_width: int, id_width: int) -> dict:
    """The members of an AXI4 address channel, ``ar`` or ``aw`` (master's view):
    ``{prefix}addr``, ``len`` (beats - 1), ``size`` (log2 bytes per beat), ``burst``,
    ``valid`` out, ``ready`` in, and ``{prefix}id`` out when ``id_width > 0``."""
    check_axi_widths(addr_width=addr_width, id_width=id_width)
    members = {
        f"{prefix}addr": Out(addr_width),
        f"{prefix}len": Out(8),
        f"{prefix}size": Out(3),
        f"{prefix}burst": Out(2),
        f"{prefix}valid": Out(1),
        f"{prefix}ready": In(1),
    }
    if id_width:
        members[f"{prefix}id"] = Out(id_width)
    return members


class AxiReadAddressSignature(wiring.Signature):
    """AXI4 AR channel, master's view. ``arsize``: log2(bytes per beat); ``arlen``: beats - 1."""

    def __init__(self, *, addr_width: int = AXI_ADDR_WIDTH, id_width: int = 0):
        self.addr_width = addr_width
        self.id_width = id_width
        super().__init__(address_channel_members("ar", addr_width=addr_width,
                                                 id_width=id_width))


class AxiReadDataSignature(wiring.Signature):
    """AXI4 R channel, slave's view (the slave drives ``rdata``; the master uses it flipped)."""

    def __init__(self, *, data_width: int, id_width: int = 0):
        check_axi_widths(data_width=data_width, id_width=id_width)
        self.data_width = data_width
        self.id_width = id_width
        members = {
            "rdata": Out(data_width),
            "rresp": Out(2),
            "rlast": Out(1),
            "rvalid": Out(1),
            "rready": In(1),
        }
        if id_width:
            members["rid"] = Out(id_width)
        super().__init__(members)


class AxiReadSignature(wiring.Signature):
    """An AXI4 read port, master's view: ``ar`` out, ``r`` in."""

    def __init__(self, *, data_width: int, addr_width: int = AXI_ADDR_WIDTH, id_width: int = 0):
        check_axi_widths(data_width=data_width, addr_width=addr_width, id_width=id_width)
        self.data_width = data_width
        self.addr_width = addr_width
        self.id_width = id_width
        super().__init__({
            "ar": Out(AxiReadAddressSignature(addr_width=addr_width, id_width=id_width)),
            "r": In(AxiReadDataSignature(data_width=data_width, id_width=id_width)),
        })


def split_bursts(addr: int, length: int, *, bytes_per_beat: int,
                 max_burst: int = AXI4_MAX_BURST) -> list[tuple[int, int]]:
    """The INCR bursts that read ``length`` beats from byte address ``addr``: a list of
    ``(araddr, beats)``. Each burst is as long as possible: at most ``max_burst`` beats and
    never across a 4 KiB boundary. The low address bits below a beat are taken as zero."""
    addr -= addr % bytes_per_beat
    bursts = []
    while length > 0:
        to_page_end = (PAGE_BYTES - addr % PAGE_BYTES) // bytes_per_beat
        beats = min(length, max_burst, to_page_end)
        bursts.append((addr, beats))
        addr += beats * bytes_per_beat
        length -= beats
    return bursts


@dataclass(frozen=True)
class ReadJob:
    """What :meth:`AxiReadMaster.expected_cycles` needs: the read commands ``(byte address,
    length in words)``, presented back to back, and the simulated DDR's timing (``ddr``, the
    board's ``[ddr_sim]``: latency and rate)."""

    commands: tuple[tuple[int, int], ...]
    ddr: DdrSimConfig

    def __post_init__(self):
        object.__setattr__(self, "commands", tuple((a, n) for a, n in self.commands))
        if not isinstance(self.ddr, DdrSimConfig):
            raise TypeError(f"ddr must be a DdrSimConfig, not {self.ddr!r}")


class BurstSplitter:
    """The command splitter of both AXI masters, built into ``m``: it cuts each command of
    ``cmd`` (``addr``, ``length`` in words) into INCR bursts exactly as :func:`split_bursts`
    does and drives the address channel ``channel`` (an AR or AW, member names with
    ``prefix``: ``arvalid`` / ``awvalid`` ...).

    Registers: ``busy`` (a command is being cut), ``addr`` and ``remaining`` (its next burst's
    byte address and the words left). ``beats`` is the next burst's length, the smallest of
    ``remaining``, ``max_burst`` and the words to the next 4 KiB boundary; ``last_burst`` that
    it ends the command. A burst is issued (``issue``, its AW/AR registered for the next
    cycle) when ``busy``, the channel's register is free or moving, and
    ``may_issue(beats)``, the owner's rule (credits, burst slots, queue room). ``cmd.ready``
    is high when idle, or while the current command's last burst issues (so commands follow
    each other without a gap on the channel), and ``cmd_hold`` is low; a command of length
    0 leaves ``busy`` low (``cmd_take`` is its handshake).
    """

    def __init__(self, m: Module, cmd, channel, prefix: str, *, max_burst: int,
                 bytes_per_word: int, may_issue, cmd_hold=None):
        addr_width = len(cmd.payload.addr)
        size = (bytes_per_word - 1).bit_length()                # log2(bytes per beat)
        page_words = PAGE_BYTES >> size
        valid, ready = getattr(channel, f"{prefix}valid"), getattr(channel, f"{prefix}ready")

        self.busy = busy = Signal(name=f"{prefix}_busy")
        addr = Signal(addr_width, name=f"{prefix}_next_addr")
        remaining = Signal(len(cmd.payload.length), name=f"{prefix}_remaining")
        # Words to the next 4 KiB boundary: 1 .. page_words.
        to_page_end = Signal(range(page_words + 1), name=f"{prefix}_to_page_end")
        self.beats = beats = Signal(range(AXI4_MAX_BURST + 1), name=f"{prefix}_beats")
        m.d.comb += to_page_end.eq(page_words - addr[size:12])
        limit = Mux(to_page_end < max_burst, to_page_end, max_burst)
        m.d.comb += beats.eq(Mux(remaining < limit, remaining, limit))
        self.last_burst = last_burst = remaining == beats

        self.issue = issue = Signal(name=f"{prefix}_issue")
        m.d.comb += issue.eq(busy & (~valid | ready) & may_issue(beats))
        with m.If(issue):
            m.d.sync += [
                valid.eq(1),
                getattr(channel, f"{prefix}addr").eq(addr),
                getattr(channel, f"{prefix}len").eq(beats - 1),
                addr.eq(addr + (beats << size)),
                remaining.eq(remaining - beats),
            ]
            with m.If(last_burst):
                m.d.sync += busy.eq(0)
        with m.Elif(ready):
            m.d.sync += valid.eq(0)
        m.d.comb += [getattr(channel, f"{prefix}size").eq(size),
                     getattr(channel, f"{prefix}burst").eq(BURST_INCR)]

        take_ok = ~busy | (issue & last_burst)
        m.d.comb += cmd.ready.eq(take_ok if cmd_hold is None else take_ok & ~cmd_hold)
        self.cmd_take = cmd.valid & cmd.ready
        with m.If(self.cmd_take):
            m.d.sync += [
                addr.eq(cmd.payload.addr & ~Const(bytes_per_word - 1, addr_width)),
                remaining.eq(cmd.payload.length),
                busy.eq(cmd.payload.length != 0),
            ]


class AxiReadMaster(wiring.Component):
    """Streams words out of memory over AXI4: read commands in, data words out, in order.

    Streams (``amaranth.lib.stream``: a beat moves on a clock edge where valid and ready are
    both high):

    * ``cmd`` in: ``addr`` (byte address; the bits below one word are ignored, taken as zero)
      and ``length`` (words, ``length_width`` bits; a length of 0 reads nothing).
    * ``data`` out: the ``length`` words at ``addr``, ``addr + bytes_per_word``, ..., for each
      command in the order the commands were taken; one ``data_width``-bit word per beat.

    AXI side (``axi``, :class:`AxiReadSignature`): INCR bursts of full-width beats
    (``arsize = log2(data_width / 8)``), fixed ID 0, so the slave returns them in order.
    A command is split into bursts of at most ``max_burst`` beats that never cross a 4 KiB
    boundary (:func:`split_bursts` is the exact split). ``arvalid`` and ``araddr/arlen`` come
    from registers; ``rready`` is high whenever the data buffer can take a beat.

    Latency hiding: up to ``max_outstanding`` bursts are in flight at once. A burst is issued
    only when the data buffer (``buffer_depth`` words, a ``SyncFIFOBuffered``) has room for
    every one of its beats, counting the beats of the bursts already in flight (credits: taken
    when the AR is issued, returned when a word leaves on ``data``). So backpressure on
    ``data`` never drops a beat, and ``rready`` stays high: the master never stalls the R
    channel, which matters on a shared interconnect.

    Latency: a command taken on cycle ``c`` drives its first AR on cycle ``c + 2``; an R beat
    taken on cycle ``t`` is offered on ``data`` on cycle ``t + 2`` at the earliest.

    Throughput: one word per cycle, so it follows the memory's bandwidth (``rate`` beats per
    cycle) as long as the words in flight cover the round trip. A credit comes back
    ``latency + 4`` cycles after it was taken, and a burst slot ``latency + 2`` cycles after
    its burst's last beat, so the memory never waits when ``buffer_depth >= max_burst +
    rate * (latency + 4)`` and any ``max_outstanding - 1`` consecutive bursts hold
    ``rate * (latency + 2)`` beats (calibrated against the simulation;
    :meth:`hides_latency` checks both for a list of commands). One AR per cycle, so commands
    as short as one word still go out back to back. :meth:`expected_cycles` is exact whenever
    ``data`` is never stalled and the slave queues at least ``max_outstanding`` ARs, latency
    hidden or not (:class:`AxiReadTiming`, the per-word events, also serves parents that take
    the words at their own pace).

    ``error`` goes high, and stays high, after any R beat with a response other than OKAY; the
    data of such a beat is passed on as received. ``idle`` is high when no command is being
    split, no burst is in flight and no word is waiting on ``data``.
    """

    def __init__(self, *, data_width: int, max_outstanding: int, addr_width: int = AXI_ADDR_WIDTH,
                 id_width: int = 0, length_width: int = 24, max_burst: int = AXI4_MAX_BURST,
                 buffer_depth: "int | None" = None):
        check_axi_widths(data_width=data_width, addr_width=addr_width, id_width=id_width)
        check_master_shape(addr_width=addr_width, length_width=length_width,
                           max_burst=max_burst, max_outstanding=max_outstanding)
        if buffer_depth is None:
            # Two full bursts: one draining while the next one's latency elapses.
            buffer_depth = max(3, 2 * max_burst)
        int_in_range("buffer_depth", buffer_depth, max(3, max_burst),
                     why="max(3, max_burst): room for one whole burst")
        self.data_width = data_width
        self.addr_width = addr_width
        self.id_width = id_width
        self.length_width = length_width
        self.max_burst = max_burst
        self.max_outstanding = max_outstanding
        self.buffer_depth = buffer_depth
        self.bytes_per_word = data_width // 8
        self.cmd_layout = data.StructLayout({
            "addr": unsigned(addr_width),
            "length": unsigned(length_width),
        })
        super().__init__({
            "cmd": In(stream.Signature(self.cmd_layout)),
            "data": Out(stream.Signature(data_width)),
            "axi": Out(AxiReadSignature(data_width=data_width, addr_width=addr_width,
                                        id_width=id_width)),
            "error": Out(1),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        ar, r = self.axi.ar, self.axi.r

        m.submodules.buffer = buffer = fifo.SyncFIFOBuffered(
            width=self.data_width, depth=self.buffer_depth)

        # Credits: words of buffer space not yet promised to an issued burst.
        credits = Signal(range(self.buffer_depth + 1), init=self.buffer_depth)
        outstanding = Signal(range(self.max_outstanding + 1))
        # issue -> cmd.ready is combinational: a 12-bit subtract and three compares. If it
        # misses 250 MHz, register ``beats`` one cycle ahead; nothing else depends on it.
        split = BurstSplitter(m, self.cmd, ar, "ar", max_burst=self.max_burst,
                              bytes_per_word=self.bytes_per_word,
                              may_issue=lambda beats: (credits >= beats)
                              & (outstanding < self.max_outstanding))
        busy, beats, issue = split.busy, split.beats, split.issue
        if self.id_width:
            m.d.comb += ar.arid.eq(0)

        # ---- R channel into the buffer; credits and the outstanding-burst count ------------
        r_take = r.rvalid & r.rready
        m.d.comb += [
            buffer.w_stream.payload.eq(r.rdata),
            buffer.w_stream.valid.eq(r.rvalid),
            # Always high by the credit rule; kept as the FIFO's ready so that a broken
            # credit count stalls the bus instead of dropping a beat.
            r.rready.eq(buffer.w_stream.ready),
        ]
        with m.If(r_take & (r.rresp != RESP_OKAY)):
            m.d.sync += self.error.eq(1)
        wiring.connect(m, buffer.r_stream, wiring.flipped(self.data))

        word_out = self.data.valid & self.data.ready
        m.d.sync += credits.eq(credits - Mux(issue, beats, 0) + word_out)
        m.d.sync += outstanding.eq(outstanding + issue - (r_take & r.rlast))
        m.d.comb += self.idle.eq(~busy & (outstanding == 0) & (credits == self.buffer_depth))
        return m

    # ---- what it computes, how long it takes --------------------------------------------------

    def bursts(self, addr: int, length: int) -> list[tuple[int, int]]:
        """The ``(araddr, beats)`` bursts this master issues for one command."""
        return split_bursts(addr, length, bytes_per_beat=self.bytes_per_word,
                            max_burst=self.max_burst)

    def model(self, memory: Sequence[int], commands: Iterable[tuple[int, int]]) -> list[int]:
        """Bit-exact model: the words of ``memory`` (indexed by word address, byte address
        divided by ``bytes_per_word``) that the ``data`` stream carries for ``commands``,
        a sequence of ``(byte address, length in words)``."""
        words = []
        for addr, length in commands:
            first = addr // self.bytes_per_word
            words.extend(memory[first + i] for i in range(length))
        return words

    @staticmethod
    def beat_cycles(beats: int, *, beats_per_window: int, window: int) -> int:
        """Cycles (first to last, inclusive) that ``beats`` R beats take at a sustained
        ``beats_per_window / window``, with the token bucket of ``DdrModel`` starting full."""
        if beats <= 0:
            return 0
        # Beat n (0-based) leaves on the first cycle k with floor(((k+1)b - 1) / w) >= n.
        return -(-((beats - 1) * window + 1) // beats_per_window)

    def hides_latency(self, job: ReadJob) -> bool:
        """True when the buffer and the burst slots keep enough words in flight to cover the
        DDR's latency at its rate for these commands (the condition in the class docstring),
        so the memory's bandwidth is the only limit and :meth:`expected_cycles` is
        ``4 + latency + beat_cycles(words)``."""
        latency, rate = job.ddr.latency, job.ddr.words_per_cycle
        beats = [n for addr, length in job.commands for _, n in self.bursts(addr, length)]
        if not beats:
            return True
        if self.buffer_depth < max(beats) + math.ceil(rate * (latency + 4)):
            return False
        # Burst j + max_outstanding is issued only after burst j's last beat: the bursts in
        # between must keep the memory busy meanwhile.
        need = math.ceil(rate * (latency + 2))
        between = self.max_outstanding - 1
        return all(sum(beats[j + 1:j + 1 + between]) >= need
                   for j in range(len(beats) - self.max_outstanding))

    def timing(self, job: ReadJob) -> "AxiReadTiming":
        """The per-word event model of the job's commands against its ``DdrModel``
        (:class:`AxiReadTiming`), for a parent that takes the words."""
        return AxiReadTiming(self, job.commands, latency=job.ddr.latency,
                             beats_per_window=job.ddr.beats_per_window, window=job.ddr.window)

    def memory_blocks(self) -> dict[str, float]:
        """The data buffer (``buffer_depth`` words of ``data_width`` bits; a
        ``SyncFIFOBuffered`` keeps ``buffer_depth - 1`` of them in its memory):
        :func:`trilut.config.memory_blocks`. Default kv260 build: 2 RAMB36 (docs/memory.md)."""
        return memory_blocks(self.data_width, self.buffer_depth - 1)

    def expected_cycles(self, job: ReadJob) -> int:
        """Cycles from the first command taken to the last word out, inclusive, for commands
        presented back to back with ``data`` never stalled, against a memory that answers
        ``job.ddr.latency`` cycles after each AR and then streams ``beats_per_window`` beats
        every ``window`` cycles (``trilut.sim.ddr_model.DdrModel``, its AR queue at least
        ``max_outstanding`` deep).

        Exact, from :class:`AxiReadTiming` (every word taken as soon as it is offered): 2
        cycles from command to AR, ``latency`` to the first R beat, 2 through the buffer, the
        beats at the memory's rate, and, when the latency is not hidden
        (:meth:`hides_latency` false), the waits for a burst slot or buffer credits.
        """
        model = self.timing(job)
        last = None
        for k in range(model.words):
            last = model.offered(k)
            model.take(k, last)
        return 0 if last is None else last + 1


class AxiReadTiming:
    """Per-word event arithmetic of an :class:`AxiReadMaster` in front of a ``DdrModel``.

    Words are asked for in order: :meth:`offered` gives the first cycle word ``k`` is offered
    on ``data`` (cycle 0: the first command taken; commands are presented back to back), and
    the parent reports with :meth:`take` the cycle it took it (at least that). Each event is
    ``max(its inputs) + latency``, from the RTL:

    * burst ``b`` is issued (``arvalid`` registered) on ``I_b >= I_{b-1} + 1`` (one AR a
      cycle; a command's first burst one cycle after it is taken, and a command is taken with
      the previous one's last burst, a zero-length one a cycle after the previous command),
      ``I_b >= f(W_b - depth) + 1`` (credits: the word ``buffer_depth`` places back, counting
      every beat up to the end of this burst, must have left ``data``) and
      ``I_b >= rlast(b - max_outstanding) + 1`` (a burst slot);
    * the memory takes the AR on ``I_b + 1``, issues the burst's beats from ``I_b + latency``
      on, strictly after the previous burst's, one per cycle at most, each when the token
      bucket holds ``window`` tokens (``beats_per_window`` added a cycle, capped at
      ``window + beats_per_window - 1``, full at the start); the R beat is taken (``rready``
      is always high by the credits) one cycle after its issue;
    * word ``k`` is offered on ``data`` on ``max(r_k + 2, f_{k-1} + 1)`` (``SyncFIFOBuffered``:
      a write reaches the output register two cycles later; one word out a cycle).
    """

    #: ``DdrModel``'s AR queue (``ar_queue_depth``); more bursts in flight than that would
    #: stall AR, which this model does not count.
    AR_QUEUE_DEPTH = 8

    def __init__(self, master: AxiReadMaster, commands: Iterable[tuple[int, int]], *,
                 latency: int, beats_per_window: int, window: int):
        int_in_range("latency", latency, 2, why="cycles")
        int_in_range("window", window, 1)
        int_in_range("beats_per_window", beats_per_window, 1, window, high_name="window")
        if master.max_outstanding > self.AR_QUEUE_DEPTH:
            raise ValueError(f"max_outstanding {master.max_outstanding} exceeds the DDR "
                             f"model's AR queue ({self.AR_QUEUE_DEPTH}): AR would stall, "
                             f"which the cycle model does not count")
        self.master = master
        self.latency, self.b, self.w = latency, beats_per_window, window
        commands = list(commands)
        limit = 1 << master.length_width
        self._burst_of = []             # word -> burst
        self._bursts = []               # (beats, first word, command)
        self._first_of_command = []     # burst index -> True when it starts a command
        self._command_gap = []          # zero-length commands before this burst's command
        zeros = 0
        for q, (addr, length) in enumerate(commands):
            if not (isinstance(addr, int) and addr >= 0 and isinstance(length, int)
                    and 0 <= length < limit):
                raise ValueError(f"read command {q} must be (byte address >= 0, length in "
                                 f"0..{limit - 1} words), not {(addr, length)!r}")
            if length == 0:
                zeros += 1
                continue
            for j, (_, beats) in enumerate(master.bursts(addr, length)):
                self._first_of_command.append(j == 0)
                self._command_gap.append(zeros if j == 0 else 0)
                self._bursts.append((beats, len(self._burst_of)))
                self._burst_of += [len(self._bursts) - 1] * beats
            zeros = 0
        self.words = len(self._burst_of)
        self._issue = []                # I_b
        self._rlast = []                # cycle burst b's last R beat is taken
        self._r = []                    # cycle word k's R beat is taken
        self._taken = []                # f_k
        self._ddr_last = None           # the memory's last beat issue
        self._tokens = window + beats_per_window - 1    # tokens on the cycle after it

    def _issue_burst(self, b: int) -> None:
        m = self.master
        beats, first = self._bursts[b]
        # The command that starts here was taken with the previous burst's issue (or one
        # cycle per zero-length command later); the first command on cycle 0.
        prev = self._issue[b - 1] if b else 0
        t = prev + 1 + self._command_gap[b]
        end = first + beats                     # words promised up to this burst's end
        if end > m.buffer_depth:
            t = max(t, self._taken[end - m.buffer_depth - 1] + 1)
        if b >= m.max_outstanding:
            t = max(t, self._rlast[b - m.max_outstanding] + 1)
        self._issue.append(t)
        # The memory: AR on t + 1, data due latency cycles after it.
        cap = self.w + self.b - 1
        due = t + self.latency
        for _ in range(beats):
            s = due if self._ddr_last is None else max(due, self._ddr_last + 1)
            if self._ddr_last is None:
                tokens = cap
            else:
                tokens = min(cap, self._tokens + self.b * (s - self._ddr_last - 1))
                if tokens < self.w:
                    wait = -(-(self.w - tokens) // self.b)
                    s += wait
                    tokens = min(cap, tokens + self.b * wait)
            self._tokens = min(cap, tokens - self.w + self.b)
            self._ddr_last = s
            self._r.append(s + 1)
        self._rlast.append(self._r[-1])

    def offered(self, k: int) -> int:
        """The first cycle word ``k`` (0-based, in command order) is offered on ``data``;
        words ``0 .. k-1`` must have been taken."""
        if k != len(self._taken):
            raise ValueError(f"word {k} asked for after {len(self._taken)} words were taken")
        b = self._burst_of[k]
        while len(self._issue) <= b:
            self._issue_burst(len(self._issue))
        r = self._r[k] + 2
        return r if not k else max(r, self._taken[k - 1] + 1)

    def take(self, k: int, cycle: int) -> None:
        """Word ``k`` left ``data`` on ``cycle``."""
        self._taken.append(cycle)
