"""An AXI4 read interconnect: several read masters on one AXI4 read port (the DDR, an HP port).

The attention block and the accelerator top have several DDR readers (weights, the RoPE table,
the KV cache), each an :class:`~trilut.hdl.memory.axi.AxiReadMaster`; the simulated DDR and a
board's S_AXI_HP port are one AXI4 read port. :class:`AxiReadArbiter` joins them: AR by
round robin, with the port index as ``arid``; R routed back by ``rid``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from trilut.config import DdrSimConfig
from trilut.hdl.memory.axi import AxiReadMaster, AxiReadSignature, check_axi_widths
from trilut.models.checks import int_in_range

__all__ = ["AxiReadArbiter", "AxiReadArbiterJob", "ArbiterSchedule", "MAX_PORTS"]

#: Ports an arbiter joins at most: 4 ID bits, the most ``check_axi_widths`` allows for
#: 16 ports with room to spare, and more than one DDR port can feed usefully (docs/memory.md).
MAX_PORTS = 16


@dataclass(frozen=True)
class AxiReadArbiterJob:
    """One stall-free run of an :class:`AxiReadArbiter` with an :class:`AxiReadMaster` on
    every port: ``masters[i]`` on port ``i`` takes ``commands[i]`` (byte address, words),
    presented back to back from cycle 0 (the first command of every port with commands is
    taken on the same cycle), against the simulated DDR ``ddr`` with an AR queue of
    ``ar_queue_depth``; ``last_grant`` is the port the arbiter granted last before the run
    (``ports - 1`` after reset)."""
    masters: tuple[AxiReadMaster, ...]
    commands: tuple[tuple[tuple[int, int], ...], ...]
    ddr: DdrSimConfig
    last_grant: int
    ar_queue_depth: int = 8


@dataclass(frozen=True)
class ArbiterSchedule:
    """What :meth:`AxiReadArbiter.schedule` predicts: ``cycles`` (first command taken .. last
    word out, inclusive), the ARs in the order the DDR takes them (``(port, byte address,
    beats)``), each port's word cycles on its ``data`` stream, and the last grant."""
    cycles: int
    ars: tuple[tuple[int, int, int], ...]
    words: tuple[tuple[int, ...], ...]
    last_grant: int


class AxiReadArbiter(wiring.Component):
    """``ports`` AXI4 read ports ``s0`` .. ``s{ports-1}`` (slaves, no ID: any
    :class:`AxiReadMaster` connects) onto one AXI4 read port ``m`` (master) with
    ``id_width = max(1, bits(ports - 1))`` ID bits.

    AR, round robin: ``last`` is the port granted last (``ports - 1`` after reset). On a cycle
    when the AR register towards ``m`` is free (empty, or taken by the slave this cycle), the
    grant goes to the first port with ``arvalid`` high in the order ``last + 1, last + 2, ...,
    last`` (mod ``ports``): that port sees ``arready`` high, and its AR (address, length, size,
    burst) is registered onto ``m`` with ``arid`` = its index. So a port with a pending AR is
    granted after at most ``ports - 1`` grants of others: no port starves, and ports that
    always have an AR pending share the AR channel in turn. The register holds its AR, unchanged,
    until ``m``'s ``arready`` (AXI4: a stalled AR keeps its payload); one AR moves each cycle.

    R, by ``rid``: ``rvalid`` goes to port ``rid`` only; ``rdata``, ``rresp``, ``rlast`` go to
    every port; ``m``'s ``rready`` is port ``rid``'s (low for an ``rid`` of no port, which
    stalls the bus rather than losing the beat). Combinational: no cycle added on R. A port's
    bursts share one ID, so the slave returns them in order (AXI4 A5.3); bursts of different
    ports may come back in any order, and each goes to its own master.

    Latency: one cycle on AR (the register), none on R. With one port active, the arbiter is
    the master's DDR with one more cycle of latency, and :meth:`expected_cycles` is
    ``AxiReadMaster.expected_cycles(..., latency=ddr latency + 1)``.

    Timing path: ``m.ar.arready`` reaches the masters' ``arready`` (and so their issue logic)
    through the grant, combinationally. If that misses 250 MHz, a two-entry skid buffer on AR
    cuts it for one register of address.
    """

    def __init__(self, *, ports: int, data_width: int, addr_width: int):
        int_in_range("ports", ports, 2, MAX_PORTS,
                     why=f"one AXI ID per port, at most {MAX_PORTS.bit_length() - 1} ID bits")
        id_width = max(1, (ports - 1).bit_length())
        check_axi_widths(data_width=data_width, addr_width=addr_width, id_width=id_width)
        self.ports = ports
        self.data_width = data_width
        self.addr_width = addr_width
        self.id_width = id_width
        port = AxiReadSignature(data_width=data_width, addr_width=addr_width, id_width=0)
        super().__init__({
            **{f"s{i}": In(port) for i in range(ports)},
            "m": Out(AxiReadSignature(data_width=data_width, addr_width=addr_width,
                                      id_width=id_width)),
        })

    def slave(self, i: int):
        """Port ``i``'s slave interface (``s{i}``)."""
        return getattr(self, f"s{i}")

    def elaborate(self, platform):
        m = Module()
        n = self.ports
        slaves = [self.slave(i) for i in range(n)]
        ar, r = self.m.ar, self.m.r

        # ---- AR: round robin into one register ------------------------------------------------
        last = Signal(range(n), init=n - 1)
        requests = Signal(n)
        m.d.comb += requests.eq(Cat(s.ar.arvalid for s in slaves))
        # Ports after ``last`` first; the lowest of them wins, else the lowest of all.
        after = Signal(n)
        m.d.comb += after.eq(requests & Cat(Const(i, range(n)) > last for i in range(n)))
        winner = Signal(range(n))
        for i in reversed(range(n)):            # later statements win: the lowest index last
            with m.If(requests[i]):
                m.d.comb += winner.eq(i)
        for i in reversed(range(n)):
            with m.If(after[i]):
                m.d.comb += winner.eq(i)

        free = ~ar.arvalid | ar.arready
        grant = free & requests.any()
        # The payload through an AND-OR of the decoded grant (fewer LUTs than a Switch from
        # 5 ports up in yosys's mapping: 274 against 416 at 8 ports; the same at 3).
        chosen = [winner == i for i in range(n)]
        payload = [Cat(s.ar.araddr, s.ar.arlen, s.ar.arsize, s.ar.arburst) for s in slaves]
        for i, s in enumerate(slaves):
            m.d.comb += s.ar.arready.eq(grant & chosen[i])
        with m.If(grant):
            m.d.sync += [ar.arvalid.eq(1), ar.arid.eq(winner), last.eq(winner),
                         Cat(ar.araddr, ar.arlen, ar.arsize, ar.arburst).eq(
                             reduce(operator.or_, (Mux(c, p, 0)
                                                   for c, p in zip(chosen, payload))))]
        with m.Elif(ar.arready):
            m.d.sync += ar.arvalid.eq(0)

        # ---- R: routed by rid ------------------------------------------------------------------
        ready = []
        for i, s in enumerate(slaves):
            mine = r.rid == i
            m.d.comb += [s.r.rdata.eq(r.rdata), s.r.rresp.eq(r.rresp), s.r.rlast.eq(r.rlast),
                         s.r.rvalid.eq(r.rvalid & mine)]
            ready.append(mine & s.r.rready)
        m.d.comb += r.rready.eq(Cat(ready).any())
        return m

    # ---- what it computes, what it costs, how long it takes -----------------------------------

    def model(self, memory: Sequence[int], job: AxiReadArbiterJob) -> list[list[int]]:
        """Bit-exact: routing is the identity on data, so port ``i`` carries the words its own
        master's model gives for its own commands, whatever the other ports do."""
        self._check_job(job)
        return [master.model(memory, commands)
                for master, commands in zip(job.masters, job.commands)]

    def memory_blocks(self) -> dict[str, int]:
        """None: one AR register and the R mux, no memory."""
        return {"bram36": 0, "uram": 0}

    def expected_cycles(self, job: AxiReadArbiterJob) -> int:
        """Cycles from the first command taken to the last word out, inclusive, when no
        ``data`` stream stalls: exact for any number of active ports (:meth:`schedule`)."""
        return self.schedule(job).cycles

    def schedule(self, job: AxiReadArbiterJob) -> ArbiterSchedule:
        """The event recurrence of the masters, this arbiter and a ``DdrModel`` for ``job``,
        stepped a cycle at a time (every event is a function of the state before it, as in
        the RTL):

        * master ``p`` issues burst ``b`` (its ``arvalid`` rises one cycle later) on the first
          cycle ``t >= I_{b-1} + 1`` (+1 per zero-length command before it) with its AR
          register free (``t >= H_{b-1}``, the previous AR's grant), credits for the burst
          (the word ``buffer_depth`` places back, counting to this burst's end, left ``data``
          before ``t``) and a burst slot (burst ``b - max_outstanding``'s last R beat taken
          before ``t``); the first burst of a command one cycle after it is taken (cycle 0);
        * the arbiter grants on ``t`` when its register is empty or the DDR takes it on ``t``
          (its AR queue holds fewer than ``ar_queue_depth`` entries), by round robin among the
          ports whose ``arvalid`` is high on ``t``;
        * the DDR pops an AR when it issues its first beat, on or after ``latency - 1``
          cycles after taking it, then one beat a cycle when its token bucket allows; a beat
          issued on ``s`` is taken on R (by port ``rid``) on ``s + 1``;
        * word ``k`` of a port leaves ``data`` on ``max(r_k + 2, f_{k-1} + 1)``.

        With one active port this is :class:`~trilut.hdl.memory.axi.AxiReadTiming` at a
        latency one cycle longer, and gives the same count."""
        self._check_job(job)
        ddr = job.ddr
        L, b, w = ddr.latency, ddr.beats_per_window, ddr.window
        cap = w + b - 1
        n = self.ports

        ports = []
        for master, commands in zip(job.masters, job.commands):
            bursts, gap, zeros = [], [], 0
            for q, (addr, length) in enumerate(commands):
                if not (isinstance(addr, int) and addr >= 0 and isinstance(length, int)
                        and 0 <= length < 1 << master.length_width):
                    raise ValueError(f"read command {q} must be (byte address >= 0, length "
                                     f"in 0..{(1 << master.length_width) - 1} words), "
                                     f"not {(addr, length)!r}")
                if length == 0:
                    zeros += 1
                    continue
                for j, burst in enumerate(master.bursts(addr, length)):
                    bursts.append(burst)
                    gap.append(zeros if j == 0 else 0)
                zeros = 0
            ends, total = [], 0
            for _, beats in bursts:
                total += beats
                ends.append(total)
            ports.append(dict(master=master, bursts=bursts, gap=gap, ends=ends, words=total,
                              issue=[], rlast=[], r=[], f=[], pending=None))

        queue = []                  # DDR AR queue: (due cycle, port, beats)
        register = None             # (port, burst) held towards the DDR
        ars, last = [], job.last_grant
        active = None               # (port, beats left) of the burst the DDR is sending
        tokens = cap
        todo = sum(p["words"] for p in ports)
        done, t = 0, 0
        while done < todo:
            # The DDR: an AR on ``t`` is queued for ``t + 1``; pops on its first beat.
            ddr_ready = len(queue) < job.ar_queue_depth
            beat = None
            if tokens >= w:
                if active is None and queue and t >= queue[0][0]:
                    _, port, beats = queue.pop(0)
                    active = (port, beats)
                if active is not None:
                    beat = active[0]
                    active = (active[0], active[1] - 1) if active[1] > 1 else None
            tokens = min(cap, tokens - (w if beat is not None else 0) + b)
            if beat is not None:
                p = ports[beat]
                p["r"].append(t + 1)
                k = len(p["f"])
                p["f"].append(t + 3 if not k else max(t + 3, p["f"][-1] + 1))
                if len(p["r"]) == p["ends"][len(p["rlast"])]:
                    p["rlast"].append(t + 1)
                done += 1
            # The arbiter's register into the DDR queue.
            pushed = None
            if register is not None and ddr_ready:
                pushed = register
                register = None
            # The grant: ports whose arvalid is high on ``t``.
            requests = [i for i, p in enumerate(ports) if p["pending"] is not None]
            granted = None
            if register is None and requests:
                granted = min(requests, key=lambda i: (i - last - 1) % n)
                register = (granted, ports[granted]["pending"])
                ports[granted]["pending"] = None
                last = granted
            if pushed is not None:
                port, index = pushed
                addr, beats = ports[port]["bursts"][index]
                queue.append((t + L - 1, port, beats))
                ars.append((port, addr, beats))
            # The masters' issue (after the grant: ``arvalid`` set on ``t`` is seen on
            # ``t + 1``; a master granted on ``t`` may issue again on ``t``).
            for p in ports:
                nb = len(p["issue"])
                if nb == len(p["bursts"]) or p["pending"] is not None:
                    continue
                master = p["master"]
                if t < (p["issue"][-1] if nb else 0) + 1 + p["gap"][nb]:
                    continue
                end = p["ends"][nb]
                if end > master.buffer_depth:
                    need = end - master.buffer_depth - 1
                    if need >= len(p["f"]) or p["f"][need] >= t:
                        continue
                if nb >= master.max_outstanding:
                    slot = nb - master.max_outstanding
                    if slot >= len(p["rlast"]) or p["rlast"][slot] >= t:
                        continue
                p["issue"].append(t)
                p["pending"] = nb           # arvalid from t + 1
            t += 1
            if t > 1_000_000 + 1000 * todo:
                raise RuntimeError("the arbiter's schedule did not finish; a model bug")
        last_word = max((p["f"][-1] for p in ports if p["f"]), default=-1)
        return ArbiterSchedule(cycles=last_word + 1, ars=tuple(ars),
                               words=tuple(tuple(p["f"]) for p in ports), last_grant=last)

    def _check_job(self, job: AxiReadArbiterJob) -> None:
        if len(job.masters) != self.ports or len(job.commands) != self.ports:
            raise ValueError(f"a job for {self.ports} ports needs {self.ports} masters and "
                             f"command lists, not {len(job.masters)} and {len(job.commands)}")
        for i, master in enumerate(job.masters):
            if (master.data_width, master.addr_width) != (self.data_width, self.addr_width):
                raise ValueError(f"master {i} is {master.data_width} x {master.addr_width} "
                                 f"bits; the arbiter is {self.data_width} x "
                                 f"{self.addr_width}")
        if not (isinstance(job.last_grant, int) and 0 <= job.last_grant < self.ports):
            raise ValueError(f"last_grant must be a port from 0 to {self.ports - 1}, "
                             f"not {job.last_grant!r}")
