"""A simulation-only DDR memory behind an AXI4 read port and an optional write port, in Amaranth.

:class:`DdrModel` runs inside the simulated design (Verilator), so a memory-bound simulation
costs no Python per cycle: the testbench preloads the image once through the backdoor ``load``
stream and then only exchanges commands and data. :class:`DdrHarness` wires any block
with an AXI4 read port and/or an AXI4 write port to a :class:`DdrModel` for testbenches.

The model is DDR4 as a (fixed latency, sustained bandwidth) pair, the two numbers a streaming
accelerator's performance depends on. It does not model banks, row hits and misses, refresh,
read/write turnaround or interconnect arbitration: their average cost belongs in the
``beats_per_window / window`` rate and the ``latency`` chosen for a board (docs/memory.md).
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from trilut.config import DdrSimConfig
from trilut.hdl.memory.axi import (AXI4_MAX_BURST, BURST_INCR, PAGE_BYTES, RESP_OKAY,
                                   AxiReadMaster, AxiReadSignature, check_axi_widths)
from trilut.hdl.memory.axi_write import AxiWriteSignature
from trilut.models.checks import int_in_range, positive_int, power_of_two

__all__ = ["VIOLATION_LAYOUT", "WRITE_VIOLATION_LAYOUT", "DdrModel", "DdrHarness",
           "DdrReadHarness", "forward_members"]

#: Sticky flags of AXI4 rules broken by a master, one bit each.
VIOLATION_LAYOUT = data.StructLayout({
    "not_incr": 1,      # arburst was not INCR
    "wrong_size": 1,    # arsize was not the full data width
    "unaligned": 1,     # araddr not aligned to a beat
    "crosses_4k": 1,    # the burst crosses a 4 KiB boundary (AXI4 A3.4.1)
})

#: Sticky flags of AXI4 rules broken on the write port: the burst rules of the read port, and
#: ``wlast`` high before a burst's last beat or low on it.
WRITE_VIOLATION_LAYOUT = data.StructLayout({
    "not_incr": 1, "wrong_size": 1, "unaligned": 1, "crosses_4k": 1,
    "wlast": 1,
})

# A free-running cycle counter stamps each AR with the cycle its data is due; entries are
# compared by the sign of (now - due), which is right for latencies below 2**31 cycles.
_TIME_WIDTH = 32


class DdrModel(wiring.Component):
    """AXI4 read slave over a memory of ``depth`` words, with fixed latency and bandwidth.

    Ports:

    * ``axi``: ``AxiReadSignature`` flipped (this is the slave). INCR bursts of full-width
      beats. Byte address ``a`` reads word ``(a // bytes_per_word) % depth``: the memory
      aliases across the address space, which lets a small model stand behind 40-bit addresses.
    * ``load`` in (backdoor; ``ready`` is always high): ``word_addr`` and ``data``; one word
      written per beat, one beat per cycle. For preloading an image; not to be mixed with
      reads in flight.
    * ``violations`` out: sticky flags (:data:`VIOLATION_LAYOUT`) of AXI4 rules broken by an
      AR: not INCR, not full width, unaligned, or crossing a 4 KiB boundary.

    Timing, both from ``ddr`` (a ``DdrSimConfig``, the board's ``[ddr_sim]``), fixed when built:

    * ``latency``: cycles from an AR handshake to its first R beat, when nothing is queued
      before it and ``rready`` is high (at least 2).
    * bandwidth: at most ``beats_per_window`` R beats in any ``window`` consecutive cycles, in
      the long run, from a token bucket: every cycle adds ``beats_per_window`` tokens, a beat
      costs ``window``, and the bucket holds ``window + beats_per_window - 1``, so an idle
      memory does not save up a burst and a busy one sends beat ``n`` of a continuous run on
      cycle ``ceil((n * window + 1) / beats_per_window) - 1`` after the first
      (``AxiReadMaster.beat_cycles``).

    With ``write=True`` it is also an AXI4 write slave (``axi_w``, ``AxiWriteSignature``
    flipped) into the same words, with a read-back port for testbenches and the host:

    * AWs wait in a queue of ``ar_queue_depth``; W beats are taken only for the burst at the
      head (``wready`` waits for its AW, as AXI allows), at most ``beats_per_window`` per
      ``window`` cycles from a token bucket of its own (reads and writes do not share
      bandwidth in this model: a simplification, docs/memory.md), each written with its
      ``wstrb`` byte enables. The burst's B (OKAY, ``bid`` = ``awid``) is offered
      ``b_latency`` cycles after its last W beat, in order. The write channels' ID width
      is ``write_id_width`` (default: ``id_width``): a block whose reads go through an
      ``AxiReadArbiter`` (IDs) and whose writes come from one master (none) has both.
    * ``write_violations`` out: sticky flags (:data:`WRITE_VIOLATION_LAYOUT`).
    * ``peek`` in (``word_addr``) / ``peek_data`` out: read any word back (one per cycle,
      ``peek_data`` registered, holding under backpressure). A read of a word written in the
      same cycle returns the old word.

    Up to ``ar_queue_depth`` ARs wait in a queue (``arready`` is low when it is full), each
    stamped with the cycle its data is due. Bursts are answered strictly in order (one ID
    order, as AXI requires for equal IDs), back to back without a gap; ``rid`` echoes
    ``arid``; ``rresp`` is always OKAY; ``rlast`` marks each burst's last beat. ``rvalid`` and
    the R payload come from registers and hold while ``rready`` is low.
    """

    def __init__(self, *, depth: int, data_width: int, addr_width: int, ddr: DdrSimConfig,
                 id_width: int = 0, ar_queue_depth: int = 8, write: bool = False,
                 b_latency: int = 2, write_id_width: int | None = None):
        check_axi_widths(data_width=data_width, addr_width=addr_width, id_width=id_width)
        if write_id_width is None:
            write_id_width = id_width
        check_axi_widths(data_width=data_width, addr_width=addr_width, id_width=write_id_width)
        power_of_two("depth", depth, 2, why="words")
        if depth * (data_width // 8) > 2 ** addr_width:
            raise ValueError(f"depth {depth} words of {data_width} bits exceeds the "
                             f"{addr_width}-bit address space")
        # The latency and the rate are the board's ``[ddr_sim]``, checked there (the latency
        # against this model's signed _TIME_WIDTH-bit time registers).
        if not isinstance(ddr, DdrSimConfig):
            raise TypeError(f"ddr must be a DdrSimConfig, not {ddr!r}")
        latency, beats_per_window, window = ddr.latency, ddr.beats_per_window, ddr.window
        positive_int("ar_queue_depth", ar_queue_depth)
        if write:
            int_in_range("b_latency", b_latency, 1, 2 ** (_TIME_WIDTH - 1) - 1, why="cycles")
        self.ddr = ddr
        self.write = write
        self.b_latency = b_latency
        self.depth = depth
        self.data_width = data_width
        self.addr_width = addr_width
        self.id_width = id_width
        self.write_id_width = write_id_width
        self.latency = latency
        self.beats_per_window = beats_per_window
        self.window = window
        self.ar_queue_depth = ar_queue_depth
        self.bytes_per_word = data_width // 8
        self.word_addr_width = (depth - 1).bit_length()
        self.load_layout = data.StructLayout({
            "word_addr": unsigned(self.word_addr_width),
            "data": unsigned(data_width),
        })
        members = {
            "axi": In(AxiReadSignature(data_width=data_width, addr_width=addr_width,
                                       id_width=id_width)),
            # Not ``always_ready``: a constant ready cannot become a top-level Verilog port,
            # and this stream often is one (the testbench preloads through it).
            "load": In(stream.Signature(self.load_layout)),
            "violations": Out(VIOLATION_LAYOUT),
        }
        if write:
            members.update({
                "axi_w": In(AxiWriteSignature(data_width=data_width, addr_width=addr_width,
                                              id_width=write_id_width)),
                "write_violations": Out(WRITE_VIOLATION_LAYOUT),
                "peek": In(stream.Signature(unsigned(self.word_addr_width))),
                "peek_data": Out(stream.Signature(data_width)),
            })
        super().__init__(members)

    @property
    def beats_per_cycle(self) -> float:
        return self.beats_per_window / self.window

    def word_index(self, byte_addr: int) -> int:
        """The memory word that byte address ``byte_addr`` reads."""
        return (byte_addr // self.bytes_per_word) % self.depth

    def elaborate(self, platform):
        m = Module()
        ar, r = self.axi.ar, self.axi.r
        size = (self.bytes_per_word - 1).bit_length()
        b, w = self.beats_per_window, self.window

        m.submodules.storage = storage = Memory(shape=self.data_width, depth=self.depth,
                                                init=[])
        backdoor = storage.write_port()
        read = storage.read_port()
        m.d.comb += [
            self.load.ready.eq(1),
            backdoor.addr.eq(self.load.payload.word_addr),
            backdoor.data.eq(self.load.payload.data),
            backdoor.en.eq(self.load.valid),
        ]

        now = Signal(_TIME_WIDTH)
        m.d.sync += now.eq(now + 1)

        # ---- AR queue: (first word, beats - 1, id, due cycle) -------------------------------
        # An AR taken on cycle t is readable from the queue on t + 1, its first beat is
        # issued to the read port on t + latency - 1 and offered on R on t + latency.
        queue, head = self._address_queue(m, "ar_queue", ar, self.violations,
                                          due=now + (self.latency - 1))
        since_due = Signal(_TIME_WIDTH)
        m.d.comb += since_due.eq(now - head.due)
        head_ready = queue.r_rdy & ~since_due[-1]

        # ---- burst engine: issue one beat's read per cycle into the R output register -------
        active = Signal()               # a burst has beats left, held below (not in the queue)
        word = Signal(self.word_addr_width)
        left = Signal(8)                # beats left after the next one
        burst_id = Signal(max(1, self.id_width))
        src_word = Mux(active, word, head.word)
        src_left = Mux(active, left, head.len)
        src_id = Mux(active, burst_id, head.id)

        advance = ~r.rvalid | r.rready  # the R register is free or being emptied
        issue = Signal()
        may = _token_bucket(m, "r", issue, beats_per_window=b, window=w)
        m.d.comb += issue.eq(advance & (active | head_ready) & may)
        m.d.comb += queue.r_en.eq(issue & ~active)

        with m.If(issue):
            with m.If(src_left == 0):
                m.d.sync += active.eq(0)
            with m.Else():
                m.d.sync += [
                    active.eq(1),
                    word.eq(src_word + 1),
                    left.eq(src_left - 1),
                    burst_id.eq(src_id),
                ]
        m.d.comb += [read.addr.eq(src_word), read.en.eq(advance)]
        with m.If(advance):
            m.d.sync += [r.rvalid.eq(issue), r.rlast.eq(src_left == 0)]
            if self.id_width:
                m.d.sync += r.rid.eq(src_id)
        m.d.comb += [r.rdata.eq(read.data), r.rresp.eq(RESP_OKAY)]
        if self.write:
            self._elaborate_write(m, storage, now)
        return m

    def _address_queue(self, m: Module, name: str, channel, flags, *, due=None):
        """The queue of an AR or AW channel: (first word, beats - 1, id[, due cycle]) per
        burst, ``ready`` while it has room, every handshake checked against the burst rules
        into ``flags``. Returns the FIFO and a view of its head entry."""
        prefix = "ar" if hasattr(channel, "araddr") else "aw"
        addr, length = getattr(channel, f"{prefix}addr"), getattr(channel, f"{prefix}len")
        valid, ready = getattr(channel, f"{prefix}valid"), getattr(channel, f"{prefix}ready")
        size = (self.bytes_per_word - 1).bit_length()
        id_width = self.id_width if prefix == "ar" else self.write_id_width
        fields = {"word": unsigned(self.word_addr_width), "len": unsigned(8),
                  "id": unsigned(max(1, id_width))}
        if due is not None:
            fields["due"] = unsigned(_TIME_WIDTH)
        entry = data.StructLayout(fields)
        m.submodules[name] = queue = fifo.SyncFIFO(width=entry.size, depth=self.ar_queue_depth)
        pushed = Signal(entry, name=f"{name}_pushed")
        m.d.comb += [pushed.word.eq(addr[size:size + self.word_addr_width]),
                     pushed.len.eq(length), queue.w_data.eq(pushed), queue.w_en.eq(valid),
                     ready.eq(queue.w_rdy)]
        if due is not None:
            m.d.comb += pushed.due.eq(due)
        if id_width:
            m.d.comb += pushed.id.eq(getattr(channel, f"{prefix}id"))
        _check_burst(m, flags, take=valid & ready, addr=addr, length=length,
                     size=getattr(channel, f"{prefix}size"),
                     burst=getattr(channel, f"{prefix}burst"), full_size=size)
        return queue, data.View(entry, queue.r_data)

    def _elaborate_write(self, m: Module, storage: Memory, now: Signal) -> None:
        aw, w, bch = self.axi_w.aw, self.axi_w.w, self.axi_w.b
        size = (self.bytes_per_word - 1).bit_length()
        b, win = self.beats_per_window, self.window

        queue, head = self._address_queue(m, "aw_queue", aw, self.write_violations)

        # ---- W beats of the head burst, at the write rate -----------------------------------
        beat = Signal(8)
        port = storage.write_port(granularity=8)
        w_take = Signal()
        may = _token_bucket(m, "w", w_take, beats_per_window=b, window=win)
        m.d.comb += [w.wready.eq(queue.r_rdy & may), w_take.eq(w.wvalid & w.wready)]
        at_end = beat == head.len
        m.d.comb += [
            port.addr.eq(head.word + beat),
            port.data.eq(w.wdata),
            port.en.eq(Mux(w_take, w.wstrb, 0)),
            queue.r_en.eq(w_take & at_end),
        ]
        with m.If(w_take):
            m.d.sync += beat.eq(Mux(at_end, 0, beat + 1))
            with m.If(w.wlast != at_end):
                m.d.sync += self.write_violations.wlast.eq(1)

        # ---- B: one response per burst, b_latency cycles after its last beat ---------------
        response = data.StructLayout({"id": unsigned(max(1, self.write_id_width)),
                                      "due": unsigned(_TIME_WIDTH)})
        m.submodules.b_queue = b_queue = fifo.SyncFIFO(width=response.size,
                                                       depth=self.ar_queue_depth)
        due = Signal(response)
        m.d.comb += [due.id.eq(head.id), due.due.eq(now + self.b_latency),
                     b_queue.w_data.eq(due), b_queue.w_en.eq(w_take & at_end)]
        b_head = data.View(response, b_queue.r_data)
        since_due = Signal(_TIME_WIDTH)
        m.d.comb += since_due.eq(now - b_head.due)
        m.d.comb += [bch.bvalid.eq(b_queue.r_rdy & ~since_due[-1]), bch.bresp.eq(RESP_OKAY),
                     b_queue.r_en.eq(bch.bvalid & bch.bready)]
        if self.write_id_width:
            m.d.comb += bch.bid.eq(b_head.id)

        # ---- read-back ------------------------------------------------------------------------
        peek = storage.read_port()
        advance = ~self.peek_data.valid | self.peek_data.ready
        m.d.comb += [peek.addr.eq(self.peek.payload), peek.en.eq(advance),
                     self.peek.ready.eq(advance), self.peek_data.payload.eq(peek.data)]
        with m.If(advance):
            m.d.sync += self.peek_data.valid.eq(self.peek.valid)


def _token_bucket(m: Module, name: str, take, *, beats_per_window: int, window: int):
    """The bandwidth limit: every cycle adds ``beats_per_window`` tokens, a beat (``take``)
    costs ``window``, the bucket holds ``window + beats_per_window - 1`` and starts full.
    Returns the signal that allows a beat this cycle."""
    b, w = beats_per_window, window
    cap = w + b - 1
    tokens = Signal(range(cap + 1), init=cap, name=f"{name}_tokens")
    refill = Signal(range(cap + b + 1), name=f"{name}_refill")
    m.d.comb += refill.eq(tokens - Mux(take, w, 0) + b)
    m.d.sync += tokens.eq(Mux(refill > cap, cap, refill))
    return tokens >= w


def _check_burst(m: Module, flags, *, take, addr, length, size, burst, full_size: int) -> None:
    """Set ``flags``' burst-rule bits for an address handshake (``take``): not INCR, not the
    full data width, unaligned, crossing 4 KiB (AXI4 A3.4.1)."""
    end_byte = addr[:12] + ((length + 1) << full_size)
    with m.If(take):
        with m.If(burst != BURST_INCR):
            m.d.sync += flags.not_incr.eq(1)
        with m.If(size != full_size):
            m.d.sync += flags.wrong_size.eq(1)
        if full_size:
            with m.If(addr[:full_size] != 0):
                m.d.sync += flags.unaligned.eq(1)
        with m.If(end_byte > PAGE_BYTES):
            m.d.sync += flags.crosses_4k.eq(1)


def forward_members(m: Module, outer, inner, members: dict) -> None:
    """Wire each of ``members`` (name -> signature member of ``inner``) of a wrapper
    ``outer`` to the same-named member of the wrapped ``inner``: ports by assignment in their
    direction, interfaces (streams) by ``wiring.connect``."""
    for name, member in members.items():
        o, i = getattr(outer, name), getattr(inner, name)
        if member.is_port:
            m.d.comb += (i.eq(o) if member.flow == In else o.eq(i))
        elif member.flow == In:
            wiring.connect(m, wiring.flipped(o), i)
        else:
            wiring.connect(m, i, wiring.flipped(o))


class DdrHarness(wiring.Component):
    """Simulation top: any block with an AXI4 read port and/or an AXI4 write port (members
    whose signature is an ``AxiReadSignature`` / ``AxiWriteSignature``), on a :class:`DdrModel`.

    Every other member of the block's signature becomes a top-level port of the same name and
    direction (streams stay streams, held inputs stay held inputs), and the harness adds:

    * ``load`` in: the DDR model's backdoor (``word_addr``, ``data``; ``ready`` always high).
    * with a read port: ``violations`` out, the DDR model's sticky AXI4 rule flags;
      ``ar_monitor`` out: ``valid`` and ``payload`` (``addr``, ``len`` = ``arlen``) only, a
      stream without ``ready`` (it cannot be stalled): one beat per AR handshake, so a
      testbench can check every burst (an ``always_ready`` stream would not do: its constant
      ``ready`` cannot be a top-level port); ``r_stalled`` out: sticky, high once ``rvalid``
      was high with ``rready`` low (a master whose credits promise that this never happens
      breaks that promise).
    * with a write port (``ddr`` built with ``write=True``): ``write_violations`` out, and
      ``peek`` / ``peek_data``, the model's read-back port.

    ``block`` and ``ddr`` are the two components, for their models and parameters.
    """

    def __init__(self, block: wiring.Component, ddr: DdrModel):
        members = block.signature.members
        reads = [n for n, mb in members.items()
                 if not mb.is_port and isinstance(mb.signature, AxiReadSignature)]
        writes = [n for n, mb in members.items()
                  if not mb.is_port and isinstance(mb.signature, AxiWriteSignature)]
        if len(reads) > 1 or len(writes) > 1:
            raise ValueError(f"{type(block).__name__} has {len(reads)} AXI read and "
                             f"{len(writes)} write ports; the DDR model serves one of each")
        if not reads and not writes:
            raise ValueError(f"{type(block).__name__} has no AXI4 port to connect a DDR to")
        if writes and not ddr.write:
            raise ValueError(f"{type(block).__name__} writes over AXI ({writes[0]!r}): build "
                             "the DdrModel with write=True")
        self.block = block
        self.ddr = ddr
        self._read = reads[0] if reads else None
        self._write = writes[0] if writes else None
        self._forwarded = {name: member for name, member in members.items()
                           if name not in (self._read, self._write)}
        ports = {**self._forwarded, "load": In(ddr.load.signature.flip())}
        if self._read:
            addr_width = len(getattr(block, self._read).ar.araddr)
            ports.update({
                "violations": Out(VIOLATION_LAYOUT),
                "ar_monitor": Out(wiring.Signature({
                    "valid": Out(1),
                    "payload": Out(data.StructLayout({"addr": unsigned(addr_width),
                                                      "len": unsigned(8)})),
                })),
                "r_stalled": Out(1),
            })
        if self._write:
            ports.update({
                "write_violations": Out(WRITE_VIOLATION_LAYOUT),
                "peek": In(ddr.peek.signature.flip()),
                "peek_data": Out(ddr.peek_data.signature),
            })
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        m.submodules.block = block = self.block
        m.submodules.ddr = ddr = self.ddr
        wiring.connect(m, wiring.flipped(self.load), ddr.load)
        forward_members(m, self, block, self._forwarded)
        if self._read:
            port = getattr(block, self._read)
            wiring.connect(m, port, ddr.axi)
            ar, r = port.ar, port.r
            m.d.comb += [
                self.ar_monitor.valid.eq(ar.arvalid & ar.arready),
                self.ar_monitor.payload.addr.eq(ar.araddr),
                self.ar_monitor.payload.len.eq(ar.arlen),
                self.violations.eq(ddr.violations),
            ]
            with m.If(r.rvalid & ~r.rready):
                m.d.sync += self.r_stalled.eq(1)
        else:
            # An unused read port: no requests, data never taken.
            m.d.comb += ddr.axi.ar.arvalid.eq(0)
        if self._write:
            wiring.connect(m, getattr(block, self._write), ddr.axi_w)
            wiring.connect(m, wiring.flipped(self.peek), ddr.peek)
            wiring.connect(m, ddr.peek_data, wiring.flipped(self.peek_data))
            m.d.comb += self.write_violations.eq(ddr.write_violations)
        return m


class DdrReadHarness(DdrHarness):
    """:class:`DdrHarness` around an :class:`AxiReadMaster` (``master``): its ``cmd``,
    ``data``, ``error`` and ``idle`` become top-level ports."""

    def __init__(self, *, depth: int, data_width: int, addr_width: int, max_outstanding: int,
                 ddr: DdrSimConfig, length_width: int = 24, max_burst: int = AXI4_MAX_BURST,
                 buffer_depth: "int | None" = None, ar_queue_depth: int = 8):
        self.master = AxiReadMaster(data_width=data_width, addr_width=addr_width,
                                    length_width=length_width, max_burst=max_burst,
                                    max_outstanding=max_outstanding, buffer_depth=buffer_depth)
        super().__init__(self.master, DdrModel(
            depth=depth, data_width=data_width, addr_width=addr_width, ddr=ddr,
            ar_queue_depth=ar_queue_depth))
