"""The accelerator's AXI4-Lite register map: one description, its exports and its slave.

A :class:`RegisterMap` is built from an ordered list of :class:`Register`; everything else comes
from that list: the offsets, :meth:`RegisterMap.to_json`, :meth:`RegisterMap.c_header`,
:meth:`RegisterMap.markdown_table` (pasted in ``docs/register_map.md``), the bit-exact
:class:`RegisterFileModel` and the hardware, :class:`AxiLiteSlave`.

Offsets are assigned from 0 in list order, one 32-bit word per register, two for a register
wider than 32 bits (``<NAME>_LO`` at the register's offset, ``<NAME>_HI`` 4 bytes above).

Access kinds:

* ``"rw"``: the host writes and reads it back; the slave drives an output port with its value.
* ``"ro"``: the hardware drives an input port and the host reads it; a write answers SLVERR
  and changes nothing. A ``constant`` ro register has no port and reads its ``reset`` value.
* ``"w1p"`` (write-1-pulse): a write drives the output port with the written bits (byte lanes
  masked by ``wstrb``) for exactly one cycle, 0 otherwise; reads return 0 (OKAY).

Any access to an offset no register holds answers SLVERR (resp 2) and changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import re

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ACCESS", "AxiLiteJob", "Field", "Register", "Word", "RegisterMap", "RegisterFileModel",
           "AxiLiteSlave", "accelerator_registers", "REGMAP_VERSION",
           "RESP_OKAY", "RESP_SLVERR"]

#: The access kinds a register may have (see the module docstring).
ACCESS = ("ro", "rw", "w1p")
DATA_WIDTH = 32
RESP_OKAY, RESP_SLVERR = 0, 2

_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")


@dataclasses.dataclass(frozen=True)
class Field:
    """A named bit range of a register (exported to the header as ``_SHIFT``/``_MASK``)."""
    name: str
    lsb: int
    width: int = 1
    doc: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"field name must be upper-case like 'BUSY', not {self.name!r}")
        if not (isinstance(self.lsb, int) and self.lsb >= 0):
            raise ValueError(f"field lsb must be a non-negative integer, not {self.lsb!r}")
        if not (isinstance(self.width, int) and self.width >= 1):
            raise ValueError(f"field width must be a positive integer, not {self.width!r}")

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb


@dataclasses.dataclass(frozen=True)
class Register:
    """One register: ``width`` 1..64 bits (over 32: two words), ``reset`` its value after
    reset (rw) or its value (constant ro)."""
    name: str
    access: str
    width: int = 32
    reset: int = 0
    doc: str = ""
    fields: tuple = ()
    constant: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"register name must be upper-case like 'STATUS', not {self.name!r}")
        if self.access not in ACCESS:
            raise ValueError(f"{self.name}: access must be one of {ACCESS}, not {self.access!r}")
        if not (isinstance(self.width, int) and not isinstance(self.width, bool)
                and 1 <= self.width <= 64):
            raise ValueError(f"{self.name}: width must be an integer from 1 to 64, "
                             f"not {self.width!r}")
        if not (isinstance(self.reset, int) and 0 <= self.reset < 1 << self.width):
            raise ValueError(f"{self.name}: reset must fit in {self.width} bits, "
                             f"not {self.reset!r}")
        if self.constant and self.access != "ro":
            raise ValueError(f"{self.name}: only an ro register can be constant, "
                             f"not a {self.access!r} one")
        if self.access == "w1p" and self.reset:
            raise ValueError(f"{self.name}: a w1p register idles at 0; reset must be 0, "
                             f"not {self.reset!r}")
        object.__setattr__(self, "fields", tuple(self.fields))
        names = set()
        for f in self.fields:
            if not isinstance(f, Field):
                raise TypeError(f"{self.name}: fields must be Field objects, not {f!r}")
            if f.lsb + f.width > self.width:
                raise ValueError(f"{self.name}: field {f.name} (bits {f.lsb}+{f.width}) "
                                 f"overruns the register's {self.width} bits")
            if f.name in names:
                raise ValueError(f"{self.name}: duplicate field name {f.name!r}")
            names.add(f.name)

    @property
    def words(self) -> int:
        return 1 if self.width <= DATA_WIDTH else 2

    @property
    def port_name(self) -> "str | None":
        """The slave's port for this register (``None`` for a constant)."""
        return None if self.constant else self.name.lower()


@dataclasses.dataclass(frozen=True)
class Word:
    """One 32-bit word of the map: ``register`` bits ``lsb`` .. ``lsb + width - 1``."""
    name: str
    offset: int
    register: Register
    lsb: int
    width: int


class RegisterMap:
    """An ordered list of registers at 4-byte-aligned offsets from 0, in an
    ``address_width``-bit window (default 12: a 4 KiB AXI4-Lite page)."""

    def __init__(self, registers, *, address_width: int = 12):
        registers = tuple(registers)
        if not registers:
            raise ValueError("a register map needs at least one register")
        seen = set()
        for reg in registers:
            if not isinstance(reg, Register):
                raise TypeError(f"registers must be Register objects, not {reg!r}")
        words, offset = [], 0
        for reg in registers:
            names = ([reg.name] if reg.words == 1 else [reg.name + "_LO", reg.name + "_HI"])
            for name in {reg.name, *names}:
                if name in seen:
                    raise ValueError(f"duplicate register name {name!r}")
            seen.update({reg.name, *names})
            for i, name in enumerate(names):
                width = min(DATA_WIDTH, reg.width - DATA_WIDTH * i)
                words.append(Word(name, offset, reg, DATA_WIDTH * i, width))
                offset += 4
        if not (isinstance(address_width, int) and 3 <= address_width <= 32):
            raise ValueError(f"address_width must be an integer from 3 to 32, "
                             f"not {address_width!r}")
        if offset > 1 << address_width:
            raise ValueError(f"the map needs {offset} bytes, more than address_width="
                             f"{address_width} reaches ({1 << address_width} bytes)")
        self.registers = registers
        self.words = tuple(words)
        self.address_width = address_width
        self.size = offset
        self._by_name = {r.name: r for r in registers}
        self._offsets = {}
        for w in words:
            self._offsets.setdefault(w.register.name, w.offset)
            self._offsets[w.name] = w.offset

    def __getitem__(self, name: str) -> Register:
        return self._by_name[name]

    def offset(self, name: str) -> int:
        """Byte offset of a register (its low word) or of a word (``X_LO``, ``X_HI``)."""
        try:
            return self._offsets[name]
        except KeyError:
            raise KeyError(f"no register or word named {name!r}") from None

    def word_at(self, address: int) -> "Word | None":
        index = (address % (1 << self.address_width)) // 4
        return self.words[index] if index < len(self.words) else None

    # --- exports -----------------------------------------------------------------------------

    def to_json(self) -> dict:
        regs = []
        for reg in self.registers:
            entry = {"name": reg.name, "offset": self.offset(reg.name), "access": reg.access,
                     "width": reg.width, "reset": reg.reset, "doc": reg.doc}
            if reg.words == 2:
                entry["words"] = [{"name": w.name, "offset": w.offset, "lsb": w.lsb}
                                  for w in self.words if w.register is reg]
            if reg.fields:
                entry["fields"] = [{"name": f.name, "lsb": f.lsb, "width": f.width,
                                    "doc": f.doc} for f in reg.fields]
            if reg.constant:
                entry["constant"] = True
            regs.append(entry)
        return {"registers": regs, "address_width": self.address_width,
                "data_width": DATA_WIDTH, "size": self.size}

    def c_header(self, prefix: str = "TRILUT") -> str:
        if not _NAME.match(prefix):
            raise ValueError(f"prefix must be an upper-case C identifier, not {prefix!r}")
        guard = f"{prefix}_REGMAP_H"
        lines = [f"/* {prefix} AXI4-Lite register map. Generated by trilut.hdl.control.regmap;",
                 " * do not edit. Unmapped offsets and writes to read-only registers answer",
                 " * SLVERR. */", f"#ifndef {guard}", f"#define {guard}", "",
                 f"#define {prefix}_REGMAP_SIZE 0x{self.size:03x}u",
                 f"#define {prefix}_REGMAP_ADDRESS_WIDTH {self.address_width}u", ""]
        for reg in self.registers:
            lines.append(f"/* {reg.name}: {reg.access}, {reg.width} bits. {reg.doc} */")
            if reg.words == 2:
                lines.append(f"#define {prefix}_{reg.name}_OFFSET "
                             f"0x{self.offset(reg.name):03x}u")
            for w in self.words:
                if w.register is reg:
                    lines.append(f"#define {prefix}_{w.name}_OFFSET 0x{w.offset:03x}u")
            if reg.reset or reg.constant:
                lines.append(f"#define {prefix}_{reg.name}_"
                             f"{'VALUE' if reg.constant else 'RESET'} 0x{reg.reset:x}u")
            for f in reg.fields:
                lines += [f"#define {prefix}_{reg.name}_{f.name}_SHIFT {f.lsb}u",
                          f"#define {prefix}_{reg.name}_{f.name}_MASK 0x{f.mask:x}u"]
            lines.append("")
        lines += [f"#endif /* {guard} */", ""]
        return "\n".join(lines)

    def markdown_table(self) -> str:
        rows = ["| Offset | Name | Access | Bits | Reset | Description |",
                "|---|---|---|---|---|---|"]
        for w in self.words:
            reg = w.register
            doc = reg.doc if w.lsb == 0 else f"{reg.name} bits {w.lsb + w.width - 1}:{w.lsb}"
            if w.lsb == 0 and reg.fields:
                doc += ". Fields: " + "; ".join(
                    f"bit{f.lsb if f.width == 1 else f's {f.lsb + f.width - 1}:{f.lsb}'} "
                    f"{f.name.lower()}" + (f" ({f.doc})" if f.doc else "") for f in reg.fields)
            access = reg.access + (" (constant)" if reg.constant else "")
            reset = (reg.reset >> w.lsb) & ((1 << w.width) - 1)
            rows.append(f"| 0x{w.offset:03x} | {w.name} | {access} | {w.width} | "
                        f"0x{reset:x} | {doc} |")
        return "\n".join(rows) + "\n"


class RegisterFileModel:
    """Bit-exact model of :class:`AxiLiteSlave`, one transaction at a time.

    ``ro_values`` gives what the hardware drives on each non-constant ro register. ``values``
    holds every rw register; ``pulses`` every nonzero w1p pulse seen, ``(name, value)``.
    """

    def __init__(self, regmap: RegisterMap, ro_values: "dict[str, int] | None" = None):
        self.regmap = regmap
        self.ro_values = dict(ro_values or {})
        self.values = {r.name: r.reset for r in regmap.registers if r.access == "rw"}
        self.pulses = []

    def _register_value(self, reg: Register) -> int:
        if reg.access == "rw":
            return self.values[reg.name]
        if reg.access == "ro":
            return reg.reset if reg.constant else self.ro_values.get(reg.name, 0)
        return 0

    def read(self, address: int) -> "tuple[int, int]":
        """``(rdata, rresp)`` of a read at ``address``."""
        word = self.regmap.word_at(address)
        if word is None:
            return 0, RESP_SLVERR
        value = self._register_value(word.register) >> word.lsb
        return value & ((1 << word.width) - 1), RESP_OKAY

    def write(self, address: int, data: int, strb: int = 0xF) -> int:
        """``bresp`` of a write at ``address``; applies it."""
        word = self.regmap.word_at(address)
        if word is None or word.register.access == "ro":
            return RESP_SLVERR
        mask = sum(0xFF << 8 * i for i in range(4) if strb >> i & 1)
        mask &= (1 << word.width) - 1
        reg = word.register
        if reg.access == "rw":
            old = self.values[reg.name]
            self.values[reg.name] = (old & ~(mask << word.lsb)) | ((data & mask) << word.lsb)
        elif data & mask:
            self.pulses.append((reg.name, (data & mask) << word.lsb))
        return RESP_OKAY


@dataclass(frozen=True)
class AxiLiteJob:
    """One AXI4-Lite transaction on an idle :class:`AxiLiteSlave`: a write (AW and W offered
    on the same cycle) or a read, with ``bready`` / ``rready`` high."""
    write: bool


class AxiLiteSlave(wiring.Component):
    """AXI4-Lite slave serving a :class:`RegisterMap`, 32-bit data.

    Ports: the AXI4-Lite channels as flat ports ``<prefix>_awaddr``, ``<prefix>_awvalid``, ...
    (the names ``cocotbext.axi.AxiLiteBus.from_prefix`` binds; ``awprot``/``arprot`` are
    accepted and ignored), and one port per register named ``register.name.lower()``: an
    output for rw (its value) and w1p (the one-cycle pulse), an input for ro (none for a
    constant).

    Protocol: one write and one read at a time, each independent of the other. AW and W may
    arrive in either order or together; each is held (``awready``/``wready`` low) once taken
    until the response has been accepted. The write takes effect the cycle after both are
    held, ``bvalid`` rises with it (latency: 1 cycle from the later of AW/W to the write, 2 to
    ``bvalid`` seen). A read answers on the cycle after ``arvalid & arready``. Unmapped
    offsets, and writes to ro registers, answer SLVERR and change nothing. The low two address
    bits are ignored (``wstrb`` selects the bytes), and address bits above ``address_width``
    are not decoded.
    """

    #: Cycles from the AW and W handshakes (taken together) to the B handshake, inclusive,
    #: and from the AR handshake to the R handshake, inclusive.
    WRITE_CYCLES, READ_CYCLES = 3, 2

    def model(self, ro_values: "dict[str, int] | None" = None) -> "RegisterFileModel":
        """The bit-exact model of the register file (responses and values)."""
        return RegisterFileModel(self.regmap, ro_values)

    def expected_cycles(self, job: AxiLiteJob) -> int:
        """Cycles of one transaction on an idle slave (``WRITE_CYCLES`` / ``READ_CYCLES``):
        the write takes effect the cycle after AW and W are held and ``bvalid`` rises with
        it; a read answers the cycle after AR."""
        if not isinstance(job, AxiLiteJob):
            raise TypeError(f"expected an AxiLiteJob, not {job!r}")
        return self.WRITE_CYCLES if job.write else self.READ_CYCLES

    def memory_blocks(self) -> dict[str, float]:
        """None: the registers are flip-flops."""
        return {}

    def __init__(self, regmap: RegisterMap, *, prefix: str = "s_axil"):
        if not isinstance(regmap, RegisterMap):
            raise TypeError(f"regmap must be a RegisterMap, not {regmap!r}")
        self.regmap = regmap
        self.prefix = prefix
        aw = regmap.address_width
        p = prefix + "_"
        members = {
            p + "awaddr": In(aw), p + "awprot": In(3), p + "awvalid": In(1),
            p + "awready": Out(1),
            p + "wdata": In(DATA_WIDTH), p + "wstrb": In(DATA_WIDTH // 8), p + "wvalid": In(1),
            p + "wready": Out(1),
            p + "bresp": Out(2), p + "bvalid": Out(1), p + "bready": In(1),
            p + "araddr": In(aw), p + "arprot": In(3), p + "arvalid": In(1),
            p + "arready": Out(1),
            p + "rdata": Out(DATA_WIDTH), p + "rresp": Out(2), p + "rvalid": Out(1),
            p + "rready": In(1),
        }
        for reg in regmap.registers:
            if reg.port_name is None:
                continue
            if reg.port_name in members:
                raise ValueError(f"register {reg.name} clashes with AXI port {reg.port_name!r}")
            members[reg.port_name] = (Out(reg.width, init=reg.reset) if reg.access == "rw"
                                      else Out(reg.width) if reg.access == "w1p"
                                      else In(reg.width))
        super().__init__(members)

    def axil(self, signal: str):
        """The flat AXI4-Lite port ``<prefix>_<signal>``."""
        return getattr(self, f"{self.prefix}_{signal}")

    def register_port(self, name: str):
        return getattr(self, self.regmap[name].port_name)

    def elaborate(self, platform):
        m = Module()
        a = self.axil
        aw = self.regmap.address_width

        # --- write: hold AW and W (either order), then apply and respond ---
        aw_addr = Signal(aw)
        aw_full = Signal()
        w_data = Signal(DATA_WIDTH)
        w_strb = Signal(DATA_WIDTH // 8)
        w_full = Signal()
        m.d.comb += [a("awready").eq(~aw_full & ~a("bvalid")),
                     a("wready").eq(~w_full & ~a("bvalid"))]
        with m.If(a("awvalid") & a("awready")):
            m.d.sync += [aw_addr.eq(a("awaddr")), aw_full.eq(1)]
        with m.If(a("wvalid") & a("wready")):
            m.d.sync += [w_data.eq(a("wdata")), w_strb.eq(a("wstrb")), w_full.eq(1)]
        with m.If(a("bvalid") & a("bready")):
            m.d.sync += a("bvalid").eq(0)

        # w1p ports idle at 0; a write overrides this below for one cycle.
        for reg in self.regmap.registers:
            if reg.access == "w1p":
                m.d.sync += self.register_port(reg.name).eq(0)

        with m.If(aw_full & w_full):
            m.d.sync += [aw_full.eq(0), w_full.eq(0), a("bvalid").eq(1),
                         a("bresp").eq(RESP_SLVERR)]
            with m.Switch(aw_addr[2:]):
                for index, word in enumerate(self.regmap.words):
                    reg = word.register
                    if reg.access == "ro":
                        continue            # default case: SLVERR
                    with m.Case(index):
                        m.d.sync += a("bresp").eq(RESP_OKAY)
                        port = self.register_port(reg.name)
                        for lane in range(DATA_WIDTH // 8):
                            lo = 8 * lane
                            if lo >= word.width:
                                break
                            bits = min(8, word.width - lo)
                            target = port[word.lsb + lo:word.lsb + lo + bits]
                            if reg.access == "rw":
                                with m.If(w_strb[lane]):
                                    m.d.sync += target.eq(w_data[lo:lo + bits])
                            else:
                                m.d.sync += target.eq(
                                    w_data[lo:lo + bits] & w_strb[lane].replicate(bits))

        # --- read: one at a time, answered the next cycle ---
        m.d.comb += a("arready").eq(~a("rvalid"))
        with m.If(a("rvalid") & a("rready")):
            m.d.sync += a("rvalid").eq(0)
        with m.If(a("arvalid") & a("arready")):
            m.d.sync += [a("rvalid").eq(1), a("rdata").eq(0), a("rresp").eq(RESP_SLVERR)]
            with m.Switch(a("araddr")[2:]):
                for index, word in enumerate(self.regmap.words):
                    reg = word.register
                    with m.Case(index):
                        m.d.sync += a("rresp").eq(RESP_OKAY)
                        if reg.constant:
                            m.d.sync += a("rdata").eq((reg.reset >> word.lsb)
                                                      & ((1 << word.width) - 1))
                        elif reg.access != "w1p":       # w1p reads as 0
                            port = self.register_port(reg.name)
                            m.d.sync += a("rdata").eq(port[word.lsb:word.lsb + word.width])
        return m


#: Version of the register map itself (major << 16 | minor), served by VERSION. Bump the
#: major on any change of an offset or meaning, the minor on an addition.
REGMAP_VERSION = 0x0001_0000

#: Error codes in ERROR (0: none).
_STATUS_FIELDS = (Field("BUSY", 0, doc="a run is in progress"),
                  Field("DONE", 1, doc="the last run finished; cleared by START"),
                  Field("ERROR", 2, doc="the last run stopped on an error; see ERROR"))


def accelerator_registers(*, address_width: int = 12) -> RegisterMap:
    """The accelerator's control/status register map."""
    ddr = [Register(f"{name}_BASE", "rw", 64, doc=f"DDR byte address of the {what}")
           for name, what in (("WEIGHTS", "packed ternary weights"),
                              ("NORMS", "RMSNorm weights"),
                              ("ROPE", "RoPE cos/sin tables"),
                              ("KV", "KV cache"),
                              ("ACT", "activation buffers"))]
    return RegisterMap([
        Register("CONTROL", "w1p", 32, doc="write 1 to START a run",
                 fields=(Field("START", 0, doc="start a run with the current settings"),)),
        Register("MODE", "rw", 1, doc="0 prefill, 1 decode"),
        Register("POSITION", "rw", 32, doc="sequence position of the first token of the run"),
        Register("TOKENS", "rw", 32, doc="number of tokens in the run"),
        *ddr,
        Register("STATUS", "ro", 3, doc="run state", fields=_STATUS_FIELDS),
        Register("ERROR", "ro", 8, doc="error code of the last failed run (0: none)"),
        Register("CYCLES_PREFILL", "ro", 64, doc="clock cycles spent in prefill runs"),
        Register("CYCLES_DECODE", "ro", 64, doc="clock cycles spent in decode runs"),
        Register("VERSION", "ro", 32, REGMAP_VERSION, constant=True,
                 doc="register map version (major << 16 | minor)"),
    ], address_width=address_width)
