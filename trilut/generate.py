"""The generator: a design configuration -> Verilog + manifest.

Everything written here comes from the design objects (STYLE.md principle 7): the port list
from the component signatures, the parameters from the frozen configuration.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from amaranth.hdl import Value
from amaranth.lib import wiring

from trilut import __version__
from trilut.config import DesignConfig
from trilut.hdl.linear.tlmm_engine import TlmmEngine
from trilut.hdl.verilog import convert

__all__ = ["design_components", "component_ports", "generate"]

MANIFEST_VERSION = 1


def design_components(design: DesignConfig, *, datapath: bool = False
                      ) -> dict[str, wiring.Component]:
    """The top-level components of the design, by Verilog module name.

    ``datapath`` adds the linear datapath's other blocks, each sized from the design's engine
    and datapath configuration (C fp16 lanes, K up to ``max_k``, the DDR word width, tile
    beats, outstanding reads, activation, norm epsilon): the AXI read master, the double-buffered weight buffer
    and the fused element-wise units. They are separate modules for now; the FFN block that
    wires them (``hdl/decoder/ffn_block.py``) fixes its shapes at build time.
    """
    components = {"tlmm_engine": TlmmEngine(design.engine)}
    if datapath:
        from trilut.hdl.memory.axi import AxiReadMaster
        from trilut.hdl.elementwise.act_quant import ActQuantizer
        from trilut.hdl.elementwise.activation import GatedActivation
        from trilut.hdl.elementwise.dequant import Dequantizer
        from trilut.hdl.elementwise.residual import ResidualAdd
        from trilut.hdl.elementwise.rmsnorm import RmsNorm
        from trilut.hdl.memory.weight_buffer import WeightBuffer
        e, d = design.engine, design.datapath
        lanes = d.lanes
        components.update({
            "axi_read_master": AxiReadMaster(data_width=d.ddr_word_bits,
                                             max_outstanding=d.max_outstanding),
            "weight_buffer": WeightBuffer(e, tile_beats=d.tile_beats, word_bits=d.ddr_word_bits),
            "rms_norm": RmsNorm(lanes=lanes, max_n=e.max_k, eps=d.norm_eps),
            "act_quantizer": ActQuantizer(e, lanes=lanes, max_n=e.max_k),
            "dequantizer": Dequantizer(e),
            "gated_activation": GatedActivation(lanes=lanes, activation=d.activation),
            "residual_add": ResidualAdd(lanes=lanes),
        })
    return components


def component_ports(component: wiring.Component) -> list[dict]:
    """Verilog ports of a component as Amaranth names them (``<member>__<sub>``)."""
    ports = [{"name": "clk", "direction": "input", "width": 1},
             {"name": "rst", "direction": "input", "width": 1}]
    for path, member, value in component.signature.flatten(component):
        ports.append({
            "name": "__".join(str(p) for p in path),
            "direction": "input" if member.flow == wiring.In else "output",
            "width": len(Value.cast(value)),
        })
    return ports


def _engine_parameters(design: DesignConfig) -> dict:
    e = design.engine
    return {
        **asdict(e),
        "block_k": e.block_k,
        "index_bits": e.index_bits,
        "table_entries": e.table_entries,
        "entry_width": e.entry_width,
        "acc_width": e.acc_width,
        "weight_beat_bits": e.weight_beat_bits,
        "act_beat_bits": e.act_beat_bits,
    }


def generate(design: DesignConfig, out: Path, *, model=None, datapath: bool = False) -> dict:
    """Write each component's Verilog and ``manifest.json`` into ``out``; return the manifest.

    The Verilog is ``trilut.hdl.verilog.convert``'s: the same text the simulator builds and
    the resource estimate synthesises.
    With ``model`` (a ``BitNetModel`` or a checkpoint directory), also write the DDR weight
    image the hardware reads (``weights.bin``, docs/weight_image.md) and list its sections.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    ports = {}
    for name, component in design_components(design, datapath=datapath).items():
        text = convert(component, name=name).text
        path = out / f"{name}.v"
        path.write_text(text)
        files[name] = {"file": path.name, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                       "lines": text.count("\n")}
        ports[name] = component_ports(component)
    board = design.board
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "generator": f"trilut {__version__}",
        "board": {"name": board.name, "part": board.part, "family": board.family,
                  "clock_mhz": board.clock_mhz, "ddr_bytes_per_second": board.ddr_bytes_per_second,
                  "resources": board.resources.as_dict()},
        "engine": _engine_parameters(design),
        "datapath": asdict(design.datapath),
        # The blocks' own count (WeightBuffer.memory_blocks), the one the fit check uses.
        "weight_buffer": design.weight_buffer_blocks,
        "modules": files,
        "ports": ports,
    }
    if model is not None:
        from trilut.host.weight_image import write_weight_image
        image = write_weight_image(out / "weights.bin", model, design.engine,
                                   ddr_word_bits=design.datapath.ddr_word_bits)
        manifest["weight_image"] = {
            "file": "weights.bin", "bytes": len(image), "ddr_word_bits": image.ddr_word_bits,
            "format_version": image.format_version,
            "layers": {name: {"address": span.address, "words": span.words}
                       for name in image.layer_names()
                       for span in [image.ddr_span(name)]},
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
