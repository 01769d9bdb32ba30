"""Mixed-precision search (BRECQ's third contribution): layer statistics, hardware cost
models and the genetic search of a bit allocation under a budget.

The searcher takes a sensitivity table and a cost function, so it can be tested (and
reused) on its own; ``sensitivity`` measures the table with the reconstructor's capture
and Fisher weights, and ``pipeline`` is the PTQ stage (search, ``mixed_precision.json``,
bits applied to the model). Importing this package
registers ``GeneticSearcher`` in ``SEARCHERS`` and ``ModelSize`` / ``BOPs`` /
``LatencyTable`` in ``COST_MODELS``.
"""
from .bits import apply_bit_map, apply_saved_bits, set_weight_bits, weight_bits_of
from .cost_models import BOPs, CostModel, LatencyTable, ModelSize
from .genetic import GeneticSearcher, SearchResult
from .layer_stats import LayerStat, trace_layer_stats
from .pipeline import MP_FILE, search_mixed_precision
from .sensitivity import UnitSpace, measure_sensitivity, search_space

__all__ = ['LayerStat', 'trace_layer_stats', 'CostModel', 'ModelSize', 'BOPs', 'LatencyTable',
           'GeneticSearcher', 'SearchResult',
           'set_weight_bits', 'weight_bits_of', 'apply_bit_map', 'apply_saved_bits', 'UnitSpace',
           'search_space', 'measure_sensitivity', 'search_mixed_precision', 'MP_FILE']
