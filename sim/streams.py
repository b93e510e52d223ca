"""cocotb 2.x drivers for :mod:`amaranth.lib.stream` interfaces, bound by signal-name prefix.

Amaranth flattens a stream member ``i`` of a component to the ports ``i__valid``,
``i__ready`` and ``i__payload``; :class:`StreamSource` drives such an input stream and
:class:`StreamSink` receives an output stream. Payloads are Python ints of any width.

Stream rules obeyed (amaranth ``lib.stream``): a transfer happens on a rising clock edge where
``valid`` and ``ready`` are both high; once ``valid`` is asserted, it and the payload stay
unchanged until that transfer; ``ready`` may change at will (so a sink can stall any cycle).

Timing: one ``RisingEdge`` per cycle, sample first, then drive
---------------------------------------------------------------

With cocotb 2.1 on Verilator 5.048 (the GPI clock; the runner sets
``COCOTB_TRUST_INERTIAL_WRITES=1``), the ``RisingEdge(clk)`` callback runs *before* the model
evaluates the edge: every read there returns the settled value of the cycle that is ending,
which is exactly what the edge samples, combinational paths included (e.g. a ``ready`` that
follows the sink's ``ready``); writes made there are inertial and take effect after the edge.
So each driver, on each edge, first reads ``valid``/``ready`` to learn whether this edge
transferred a beat, then writes its outputs for the next cycle. No ``ReadOnly`` wait is needed.
All drivers of one clock share one :class:`ClockTicker` task, so a cycle costs one trigger
await however many drivers there are (measured: a source and a sink on a 300-bit stream run at
about 20k cycles/s; a bare ``RisingEdge`` loop at about 45k cycles/s; each 300-bit VPI read or
write costs 5-15 us). ``tests/test_sim_infra.py`` checks transfer timing exactly (latency,
one beat per cycle, no duplicates), so a change in these semantics fails loudly.

A driver only transfers after the edge following its creation; create sources and sinks after
reset (or keep their queues empty during reset), since Amaranth's reset is synchronous.
"""

import itertools
import random
from collections import deque
from collections.abc import Iterable, Iterator

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import Event, RisingEdge

__all__ = [
    "ClockTicker", "CycleCounter", "StreamProtocolError", "StreamSink", "StreamSource",
    "StreamTimeout",
    "never_pause", "random_pause", "reset", "start_clock",
]


class StreamTimeout(TimeoutError):
    """A wait on a stream driver did not finish within its ``timeout_cycles``."""


class StreamProtocolError(AssertionError):
    """The design broke the stream rules: it dropped ``valid`` or changed the payload of a
    beat before the beat was transferred."""


# --- clock, reset, cycle counting ------------------------------------------------------------

def start_clock(clk, period_ns: int = 10) -> Clock:
    """Start a free-running clock on ``clk`` (``period_ns`` must be even) and return it."""
    clock = Clock(clk, period_ns, unit="ns")
    clock.start(start_high=False)
    return clock


async def reset(clk, rst, cycles: int = 2) -> None:
    """Hold the synchronous, active-high ``rst`` for ``cycles`` rising edges of ``clk``.

    Returns right after the edge that ends the reset, with ``rst`` already low again.
    """
    if not (isinstance(cycles, int) and cycles >= 1):
        raise ValueError(f"cycles must be a positive integer, not {cycles!r}")
    rst.value = 1
    edge = RisingEdge(clk)
    for _ in range(cycles):
        await edge
    rst.value = 0


class ClockTicker:
    """The one task per clock that steps every stream driver and counts cycles.

    Each rising edge it increments :attr:`cycle` and calls every driver's ``_on_edge``, which
    samples the transfer this edge makes and writes the driver's outputs for the next cycle.
    Get it with :meth:`of`; it is created on first use in each cocotb test.
    """

    _by_clock: dict = {}

    def __init__(self, clk):
        self.clk = clk
        #: Number of rising edges seen since this ticker started.
        self.cycle = 0
        self._drivers = []
        self._task = cocotb.start_soon(self._run())

    @classmethod
    def of(cls, clk) -> "ClockTicker":
        ticker = cls._by_clock.get(clk)
        if ticker is None or ticker._task.done():
            # cocotb cancels a test's tasks when it ends, so each test gets a fresh ticker.
            ticker = cls._by_clock[clk] = cls(clk)
        return ticker

    def _add(self, driver) -> None:
        self._drivers.append(driver)

    async def _run(self) -> None:
        edge = RisingEdge(self.clk)
        drivers = self._drivers
        while True:
            await edge
            self.cycle += 1
            cycle = self.cycle
            for driver in drivers:
                driver._on_edge(cycle)


class CycleCounter:
    """Counts rising edges of ``clk`` and measures cycles between named events.

    ``counter.mark("start")`` ... ``counter.mark("done")``; ``counter.between("start", "done")``.
    Stream drivers record the cycle of every transfer in ``handshake_cycles`` on the same scale
    (so ``sink.handshake_cycles[0] - source.handshake_cycles[0]`` is a latency).
    """

    def __init__(self, clk):
        self._ticker = ClockTicker.of(clk)
        self.marks: dict[str, int] = {}

    @property
    def cycle(self) -> int:
        return self._ticker.cycle

    def mark(self, event: str) -> int:
        self.marks[event] = self._ticker.cycle
        return self._ticker.cycle

    def between(self, start: str, end: str) -> int:
        return self.marks[end] - self.marks[start]


# --- pause generators ------------------------------------------------------------------------

def random_pause(seed, probability: float) -> Iterator[bool]:
    """An endless, reproducible iterator of pause flags: ``True`` with ``probability``.

    Give it to a source (idle cycles on ``valid``) or a sink (backpressure on ``ready``),
    in the manner of cocotbext-axi's pause generators. Any iterable of bools works as well,
    e.g. ``itertools.cycle([False, False, True])``.
    """
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"probability must be in [0, 1), not {probability!r}")
    rng = random.Random(seed)
    draw = rng.random
    while True:
        yield draw() < probability


def stalls(probability: float, seed) -> Iterator[bool]:
    """``random_pause(seed, probability)``, or ``never_pause()`` when ``probability`` is 0:
    what a testbench hands every driver for a run "with stalls of ``probability``"."""
    return random_pause(seed, probability) if probability else never_pause()


def never_pause() -> Iterator[bool]:
    """The pause generator that never pauses (full throughput)."""
    return itertools.repeat(False)


# --- signal access ---------------------------------------------------------------------------

def _port(dut, prefix: str, member: str, *, required: bool):
    name = f"{prefix.removesuffix('__')}__{member}"
    try:
        return getattr(dut, name)
    except AttributeError:
        if required:
            raise AttributeError(f"{dut._name} has no port {name!r}") from None
        return None


# Stream drivers touch their ports every cycle, so they use cocotb's raw GPI calls where that
# is equivalent to the public API: under Verilator the cocotb runner sets
# COCOTB_TRUST_INERTIAL_WRITES=1, and then ``handle.value = x`` is exactly a deposit through
# the raw handle, minus a range check (done once, when a beat is queued) and the LogicArray
# round trip. Without that setting, writes go through the public API.

def _writer(handle):
    raw = getattr(handle, "_handle", None)
    if raw is None or not getattr(cocotb.handle, "_trust_inertial", False):
        def write(value: int) -> None:
            handle.value = value
        return write
    deposit = cocotb.handle._GPISetAction.DEPOSIT.value
    width = len(handle)
    if width <= 32:
        set_int = raw.set_signal_val_int
        return lambda value: set_int(deposit, value)
    set_binstr = raw.set_signal_val_binstr
    spec = f"0{width}b"
    return lambda value: set_binstr(deposit, format(value, spec))


def _bit_reader(handle):
    get_binstr = handle._handle.get_signal_val_binstr

    def read() -> bool:
        value = get_binstr()
        if value == "1":
            return True
        if value == "0":
            return False
        raise ValueError(f"{handle._path} is {value!r}, not 0 or 1")
    return read


def _int_reader(handle):
    get_binstr = handle._handle.get_signal_val_binstr

    def read() -> int:
        value = get_binstr()
        try:
            return int(value, 2)
        except ValueError:
            raise ValueError(f"{handle._path} holds non-binary bits: {value!r}") from None
    return read


class _Waiter:
    __slots__ = ("target", "deadline", "event", "timed_out")

    def __init__(self, target: int, deadline):
        self.target = target
        self.deadline = deadline
        self.event = Event()
        self.timed_out = False


class _StreamDriver:
    def __init__(self, dut, prefix: str, clk, pause):
        self.dut = dut
        self.prefix = prefix.removesuffix("__")
        self.clk = clk
        self._pause = iter(pause) if pause is not None else None
        self._ticker = ClockTicker.of(clk)
        #: Cycle (on the :class:`ClockTicker` scale) of every transfer, in order.
        self.handshake_cycles: list[int] = []
        self._waiters: list[_Waiter] = []

    def set_pause(self, pause: "Iterable[bool] | None") -> None:
        """Replace the pause generator (``None``: never pause)."""
        self._pause = iter(pause) if pause is not None else None

    @property
    def cycle(self) -> int:
        return self._ticker.cycle

    async def _wait_count(self, target: int, timeout_cycles, what: str) -> None:
        if self._count() >= target:
            return
        deadline = None if timeout_cycles is None else self._ticker.cycle + timeout_cycles
        waiter = _Waiter(target, deadline)
        self._waiters.append(waiter)
        await waiter.event.wait()
        if waiter.timed_out:
            raise StreamTimeout(f"{self.prefix}: timed out after {timeout_cycles} cycles "
                                f"waiting for {what} ({self._count()} of {target} done)")

    def _wake(self, cycle: int) -> None:
        count = self._count()
        keep = []
        for waiter in self._waiters:
            if count >= waiter.target:
                waiter.event.set()
            elif waiter.deadline is not None and cycle >= waiter.deadline:
                waiter.timed_out = True
                waiter.event.set()
            else:
                keep.append(waiter)
        self._waiters = keep


class StreamSource(_StreamDriver):
    """Drives the ``<prefix>__valid/__payload`` inputs of a stream into the design.

    ``send_nowait`` / ``send`` / ``send_all`` queue payload ints; the source presents one per
    transfer, holding ``valid`` and the payload until ``ready``. ``pause`` (an iterable of
    bools, one drawn per cycle) inserts idle cycles between beats, never inside one.
    A stream without a ``ready`` port (``always_ready``) is taken as always ready.
    """

    def __init__(self, dut, prefix: str, clk, pause: "Iterable[bool] | None" = None):
        super().__init__(dut, prefix, clk, pause)
        self._valid = _port(dut, prefix, "valid", required=True)
        self._payload = _port(dut, prefix, "payload", required=False)
        self._ready = _port(dut, prefix, "ready", required=False)
        self._width = len(self._payload) if self._payload is not None else 0
        self._write_valid = _writer(self._valid)
        self._write_payload = _writer(self._payload) if self._payload is not None else None
        self._read_ready = _bit_reader(self._ready) if self._ready is not None else None
        self._queue: deque[int] = deque()
        self._driving = False       # a beat is on offer this cycle
        self._valid_high = False    # valid as last written
        self._accepted = 0
        self._queued = 0
        self._write_valid(0)
        self._ticker._add(self)

    def _count(self) -> int:
        return self._accepted

    @property
    def accepted(self) -> int:
        """Number of beats transferred so far."""
        return self._accepted

    @property
    def idle(self) -> bool:
        """True when nothing is queued or in flight."""
        return not self._driving and not self._queue

    def send_nowait(self, payload: int) -> None:
        """Queue one beat; returns at once."""
        if not isinstance(payload, int) or payload < 0 or payload >> self._width:
            raise ValueError(f"{self.prefix}: payload must be an int in "
                             f"[0, 2**{self._width}), not {payload!r}")
        self._queue.append(payload)
        self._queued += 1

    async def send(self, payload: int, *, timeout_cycles: "int | None" = None) -> int:
        """Queue one beat and wait until it is transferred; return its transfer cycle."""
        self.send_nowait(payload)
        target = self._queued
        await self._wait_count(target, timeout_cycles, "a beat to be accepted")
        return self.handshake_cycles[target - 1]

    async def send_all(self, payloads: Iterable[int], *,
                       timeout_cycles: "int | None" = None) -> None:
        """Queue all beats and wait until the last one is transferred."""
        for payload in payloads:
            self.send_nowait(payload)
        await self.wait_idle(timeout_cycles=timeout_cycles)

    async def wait_idle(self, *, timeout_cycles: "int | None" = None) -> None:
        """Wait until every queued beat is transferred."""
        await self._wait_count(self._queued, timeout_cycles, "all beats to be accepted")

    def _on_edge(self, cycle: int) -> None:
        # Reads here see the cycle that is ending: did this edge take the beat on offer?
        if self._driving and (self._read_ready is None or self._read_ready()):
            self._driving = False
            self._accepted += 1
            self.handshake_cycles.append(cycle)
        pause = next(self._pause) if self._pause is not None else False
        if not self._driving and self._queue and not pause:
            if self._write_payload is not None:
                self._write_payload(self._queue.popleft())
            else:
                self._queue.popleft()
            self._driving = True
        if self._driving != self._valid_high:
            self._write_valid(int(self._driving))
            self._valid_high = self._driving
        if self._waiters:
            self._wake(cycle)


class StreamSink(_StreamDriver):
    """Receives a stream from the design on ``<prefix>__valid/__ready/__payload``.

    Every transferred payload is appended, as an int, to :attr:`received` (with its cycle in
    ``handshake_cycles``); ``recv`` / ``recv_n`` hand them out in order. ``pause`` (an iterable
    of bools, one drawn per cycle) drops ``ready`` for that cycle. A stream without a ``valid``
    port (``always_valid``) transfers on every ready cycle; without a ``ready`` port
    (``always_ready``) the sink cannot stall, so ``pause`` is rejected.

    With ``check_protocol`` (the default) the sink also checks the design's side of the rules
    on every stalled cycle: once offered, a beat must stay offered, unchanged, until taken;
    otherwise it raises :class:`StreamProtocolError`, failing the test. This costs a read of
    ``valid`` every cycle and of the payload on stalled cycles.
    """

    def __init__(self, dut, prefix: str, clk, pause: "Iterable[bool] | None" = None, *,
                 check_protocol: bool = True):
        super().__init__(dut, prefix, clk, pause)
        self._check = bool(check_protocol)
        self._held = None             # (payload, cycle) of a beat offered while stalled
        self._valid = _port(dut, prefix, "valid", required=False)
        self._payload = _port(dut, prefix, "payload", required=False)
        self._ready = _port(dut, prefix, "ready", required=False)
        if self._ready is None and pause is not None:
            raise ValueError(f"{self.prefix}: stream has no ready port, so it cannot be paused")
        #: Every payload received, in order.
        self.received: list[int] = []
        self._read_index = 0
        self._ready_high = False      # ready as driven for the current cycle
        self._read_valid = _bit_reader(self._valid) if self._valid is not None else None
        self._read_payload = _int_reader(self._payload) if self._payload is not None else None
        self._write_ready = _writer(self._ready) if self._ready is not None else None
        if self._write_ready is not None:
            self._write_ready(0)
        self._ticker._add(self)

    def _count(self) -> int:
        return len(self.received)

    @property
    def stallable(self) -> bool:
        """True when the stream has a ``ready`` port, so the sink can apply backpressure."""
        return self._ready is not None

    def set_pause(self, pause: "Iterable[bool] | None") -> None:
        if self._ready is None and pause is not None:
            raise ValueError(f"{self.prefix}: stream has no ready port, so it cannot be paused")
        super().set_pause(pause)

    async def recv(self, *, timeout_cycles: "int | None" = None) -> int:
        """Return the next received payload not yet handed out, waiting for it if needed."""
        return (await self.recv_n(1, timeout_cycles=timeout_cycles))[0]

    async def recv_n(self, n: int, *, timeout_cycles: "int | None" = None) -> list[int]:
        """Return the next ``n`` received payloads not yet handed out, waiting as needed."""
        target = self._read_index + n
        await self._wait_count(target, timeout_cycles, f"{n} beats")
        beats = self.received[self._read_index:target]
        self._read_index = target
        return beats

    async def wait_count(self, n: int, *, timeout_cycles: "int | None" = None) -> None:
        """Wait until ``n`` beats in total have been received."""
        await self._wait_count(n, timeout_cycles, f"{n} beats in total")

    def _on_edge(self, cycle: int) -> None:
        # Reads here see the cycle that is ending: did this edge transfer a beat to us?
        ready = self._ready_high
        if self._read_valid is None:
            valid = True
        elif ready or self._check:
            valid = self._read_valid()
        else:
            valid = False
        if self._held is not None and not valid:
            raise StreamProtocolError(
                f"{self.prefix}: valid dropped at cycle {cycle} before the beat offered since "
                f"cycle {self._held[1]} ({self._held[0]:#x}) was transferred")
        if valid and (ready or self._check):
            payload = self._read_payload() if self._read_payload is not None else 0
            if self._held is not None and payload != self._held[0]:
                raise StreamProtocolError(
                    f"{self.prefix}: payload changed at cycle {cycle} from {self._held[0]:#x} "
                    f"to {payload:#x} before the beat offered since cycle {self._held[1]} "
                    f"was transferred")
            if ready:
                self.received.append(payload)
                self.handshake_cycles.append(cycle)
                self._held = None
            elif self._held is None:
                self._held = (payload, cycle)
        if self._write_ready is not None:
            ready = not next(self._pause) if self._pause is not None else True
            if ready != self._ready_high:
                self._write_ready(int(ready))
                self._ready_high = ready
        else:
            self._ready_high = True
        if self._waiters:
            self._wake(cycle)


async def backdoor_load(dut, clk, words, *, addr_width: int, prefix: str = "load") -> None:
    """Write ``(word address, data hex)`` pairs through a memory model's backdoor stream
    (payload: address in the low ``addr_width`` bits, data above). Python per word, once,
    before the timed part of a run (``trilut.sim.ddr_model.DdrModel.load``)."""
    load = StreamSource(dut, prefix, clk)
    for addr, word in words:
        load.send_nowait(addr | int(word, 16) << addr_width)
    await load.wait_idle(timeout_cycles=len(words) + 100)
