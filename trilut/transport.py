"""The interface between the host and whatever runs the hardware (docs/architecture.md).

The host (``trilut.host``) describes work as data and hands it to a :class:`Transport`; the
simulator (``trilut.sim.transport.SimulationTransport``, Verilator) and, later, a board are
two implementations. Nothing here knows either side: this module sits beside the
configuration, below both ``host`` and ``sim``.

A block-level run is a :class:`StreamRun`: the words to place in the block's DDR (if it has
one), then phases, each with the held scalar inputs to set, the beats to drive into every
input stream, and the beats expected on every output stream. Streams follow
``amaranth.lib.stream`` (a beat moves on a clock edge where ``valid`` and ``ready`` are high);
payloads are Python ints in the stream's flattened bit layout.

What every run checks, whoever runs it: each output beat equals the expected beat, in order;
no output beat follows the last expected one; the flags named in ``clean_flags`` read zero
at the end; and, in a phase with no stalls (``stall`` and every ``stream_stalls`` entry 0)
and an ``expected_cycles``, the measured cycles equal it. Cycles are counted from the first
input beat taken in the phase to its last output beat, inclusive.

A phase can also ask for checks of its own once it is done: ``settle_cycles`` of silence on
every output after its last expected beat (a stray or duplicated beat is then named with this
phase, not found as a wrong first beat of the next one; it also lets the block go idle before
the next phase starts), and then ``flags``, output ports that must read the given values
(``{"idle": 1}``). An output that does not carry its expected beats within the phase's
``timeout_cycles`` fails the run there. Output streams without a ``ready`` (a monitor of a
handshake inside the block, such as ``DdrHarness.ar_monitor``) are expected like any other
output, only never stalled.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["BlockRequest", "StreamPhase", "StreamRun", "PhaseResult", "Transport"]


@dataclass(frozen=True)
class BlockRequest:
    """Which hardware block to run: a block kind the transport knows (``tlmm_engine``,
    ``weight_fed_tlmm``, ``bitlinear``, ``ffn_block``) and the parameters that build it
    (the engine and datapath configuration, shapes, the DDR model's settings)."""
    kind: str
    params: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class StreamPhase:
    name: str
    inputs: Mapping[str, Sequence[int]]
    expected: Mapping[str, Sequence[int]]
    scalars: Mapping[str, int] = field(default_factory=dict)
    stall: float = 0.0              # idle / backpressure probability on every stream
    seed: int = 0
    expected_cycles: int | None = None   # asserted when no stream stalls
    #: Stream name -> its own idle / backpressure probability, instead of ``stall`` (one side
    #: of a block stalling more than the other).
    stream_stalls: Mapping[str, float] = field(default_factory=dict)
    #: Cycles every output must stay silent after the phase's last expected beat (no
    #: backpressure meanwhile), before ``flags`` are read and the next phase starts.
    settle_cycles: int = 0
    #: Output ports that must read these values once the phase has settled.
    flags: Mapping[str, int] = field(default_factory=dict)
    #: Cycles each output may take to carry its expected beats (``None``: a generous bound
    #: from the phase's beat count). A block that falls short fails the run there.
    timeout_cycles: int | None = None

    @property
    def stalls(self) -> bool:
        """True when any stream of this phase idles or is backpressured."""
        return bool(self.stall or any(self.stream_stalls.values()))

    def __post_init__(self):
        if not 0.0 <= self.stall < 1.0:
            raise ValueError(f"phase {self.name!r}: stall must be in [0, 1), not {self.stall!r}")
        for stream, stall in self.stream_stalls.items():
            if not 0.0 <= stall < 1.0:
                raise ValueError(f"phase {self.name!r}: the stall of {stream!r} must be in "
                                 f"[0, 1), not {stall!r}")
        if not self.expected:
            raise ValueError(f"phase {self.name!r}: expects no output beat; a run must check "
                             "something")
        if self.expected_cycles is not None and self.expected_cycles < 1:
            raise ValueError(f"phase {self.name!r}: expected_cycles must be positive, "
                             f"not {self.expected_cycles!r}")
        if not (isinstance(self.settle_cycles, int) and self.settle_cycles >= 0):
            raise ValueError(f"phase {self.name!r}: settle_cycles must be a non-negative "
                             f"integer, not {self.settle_cycles!r}")
        if self.timeout_cycles is not None and not (isinstance(self.timeout_cycles, int)
                                                    and self.timeout_cycles >= 1):
            raise ValueError(f"phase {self.name!r}: timeout_cycles must be a positive "
                             f"integer, not {self.timeout_cycles!r}")


@dataclass(frozen=True)
class StreamRun:
    phases: Sequence[StreamPhase]
    #: DDR word address -> word, written by backdoor before the first phase.
    memory: Mapping[int, int] = field(default_factory=dict)
    #: Output ports that must read zero after the last phase (error and rule-violation flags).
    clean_flags: Sequence[str] = ()
    #: Cycles the outputs must stay silent after the last phase.
    quiet_cycles: int = 40

    def __post_init__(self):
        if not self.phases:
            raise ValueError("a stream run needs at least one phase")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, not {names!r}")

    def as_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["memory"] = sorted(self.memory.items())
        return data


@dataclass(frozen=True)
class PhaseResult:
    name: str
    outputs: dict[str, list[int]]       # what each output stream carried in this phase
    cycles: int                         # first input beat taken .. last output beat, inclusive
    #: Cycle of every transfer on every stream in this phase, relative to the phase's first
    #: input beat (for latency and throughput checks).
    handshakes: dict[str, list[int]]


class Transport(abc.ABC):
    """Runs hardware for the host. Raises ``AssertionError`` (a subclass of it) when a run's
    checks fail, naming the phase, the stream and the first differing beat."""

    @abc.abstractmethod
    def run_stream(self, block: BlockRequest, run: StreamRun) -> list[PhaseResult]:
        """Build (or reuse) ``block``, execute ``run`` on it and return each phase's result."""
