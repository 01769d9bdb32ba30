"""Hardware cost of a bit configuration: model size, BOPs, or a measured latency table.

A *bit config* maps a layer name to ``(w_bits, a_bits)``; ``a_bits=None`` means the
layer's input stays in float (counted as 32 bits), and a layer absent from the map is a
float layer (32, 32). The searcher only sees ``cost(bit_config) -> float``, so the budget
can be any of these without the search knowing which; every model here is a sum over
layers, which lets the searcher find the cheapest configuration group by group.
"""
import csv
import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from mmbrecq.registry import COST_MODELS

from .layer_stats import LayerStat

FLOAT_BITS = 32
#: megabyte of ModelSize: 2**20 bytes, as the size columns of the BRECQ paper
MB = 2 ** 20

Bits = Tuple[Optional[int], Optional[int]]
BitConfig = Mapping[str, Bits]


def _as_stats(layer_stats: Iterable[Union[LayerStat, Mapping]]) -> List[LayerStat]:
    """Accept LayerStat objects or plain dicts (from a config or a saved JSON)."""
    return [s if isinstance(s, LayerStat) else LayerStat(**s) for s in layer_stats]


class CostModel:
    """Common interface: ``cost(bit_config) -> float`` summed over the traced layers.

    Args:
        layer_stats: output of :func:`trace_layer_stats` (or dicts with the same keys).
    """

    def __init__(self, layer_stats: Iterable[Union[LayerStat, Mapping]]):
        self.layer_stats = _as_stats(layer_stats)
        self._names = {s.name for s in self.layer_stats}

    def layer_cost(self, stat: LayerStat, w_bits: int, a_bits: int) -> float:
        raise NotImplementedError

    def cost(self, bit_config: BitConfig) -> float:
        """Total cost; a name that is not a traced layer is an error (it is a typo)."""
        unknown = sorted(set(bit_config) - self._names)
        if unknown:
            raise KeyError(f'{type(self).__name__}: bit config names unknown layers {unknown}')
        total = 0.0
        for stat in self.layer_stats:
            w_bits, a_bits = bit_config.get(stat.name, (None, None))
            total += self.layer_cost(stat, w_bits or FLOAT_BITS, a_bits or FLOAT_BITS)
        return total

    __call__ = cost


@COST_MODELS.register_module()
class ModelSize(CostModel):
    """Weight storage in MB (2**20 bytes): sum of ``params * w_bits / 8``.

    The weights dominate what is shipped to a device; biases and quantization parameters
    (a few values per channel) are left out, as in the paper.
    """

    def layer_cost(self, stat, w_bits, a_bits):
        return stat.params * w_bits / 8 / MB


@COST_MODELS.register_module()
class BOPs(CostModel):
    """Bit operations: sum of ``MACs * w_bits * a_bits`` per sample.

    The usual proxy for the compute of a fixed-point accelerator, where a multiply costs
    roughly the product of its operand widths; float activations count as 32 bits.
    """

    def layer_cost(self, stat, w_bits, a_bits):
        return float(stat.macs) * w_bits * a_bits


def _read_table(path: str) -> List[Mapping]:
    """Rows of a JSON list (or ``{"rows": [...]}``) or of a CSV file with a header."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in ('.json', '.csv'):
        raise ValueError(f'latency table {path}: expected a .json or .csv file')
    with open(path, newline='') as f:
        if ext == '.csv':
            return list(csv.DictReader(f))
        rows = json.load(f)
    return rows['rows'] if isinstance(rows, dict) else rows


@COST_MODELS.register_module()
class LatencyTable(CostModel):
    """Latency in ms from a table measured on the target device, summed over layers.

    Real kernels are not proportional to BOPs (a 2-bit kernel may not exist, small layers
    are memory bound), so the only faithful cost is a measured one. The table has one row
    per (layer, w_bits, a_bits) with columns ``layer, w_bits, a_bits, latency_ms``; use
    32 for float. Layers missing from the bit config are looked up at (32, 32).

    Args:
        layer_stats: the layers to sum over.
        table: path of a ``.json`` (list of row objects) or ``.csv`` (header row) file.

    Raises:
        KeyError: from ``cost`` when the table has no entry for a layer at its bits.
    """

    def __init__(self, layer_stats, table: str):
        super().__init__(layer_stats)
        self.table_path = str(table)
        self.table: Dict[Tuple[str, int, int], float] = {}
        for i, row in enumerate(_read_table(self.table_path)):
            try:
                key = (str(row['layer']), int(row['w_bits']), int(row['a_bits']))
                self.table[key] = float(row['latency_ms'])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f'latency table {self.table_path}, row {i}: {row!r} needs '
                                 f'layer, w_bits, a_bits, latency_ms ({e!r})') from None

    def layer_cost(self, stat, w_bits, a_bits):
        try:
            return self.table[(stat.name, w_bits, a_bits)]
        except KeyError:
            raise KeyError(f'latency table {self.table_path} has no entry for layer '
                           f'{stat.name!r} at w_bits={w_bits}, a_bits={a_bits}') from None
