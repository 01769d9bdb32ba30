"""Mixed-precision search (BRECQ's third contribution): layer statistics, hardware cost
models and the genetic search of a bit allocation under a budget.

These parts need no reconstruction engine: the searcher takes a sensitivity table and a
cost function, so they can be tested (and reused) on their own. Importing this package
registers ``GeneticSearcher`` in ``SEARCHERS`` and ``ModelSize`` / ``BOPs`` /
``LatencyTable`` in ``COST_MODELS``.
"""
from .cost_models import (BOPs, CostModel, LatencyTable, ModelSize, bit_config_of,
                          group_cost_fn)
from .genetic import GeneticSearcher, SearchResult
from .layer_stats import LayerStat, trace_layer_stats

__all__ = ['LayerStat', 'trace_layer_stats', 'CostModel', 'ModelSize', 'BOPs', 'LatencyTable',
           'bit_config_of', 'group_cost_fn', 'GeneticSearcher', 'SearchResult']
