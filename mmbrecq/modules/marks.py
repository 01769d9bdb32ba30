"""The marks ``quantize_model`` leaves on the modules that become reconstruction units.

A unit is marked with its kind (``BasicBlock``, ``Conv2d`` …) and, for a single layer
followed by parameter-free ops that belong to it, the names of that tail; the
reconstruction finds its units from these marks (:func:`mmbrecq.reconstruction.find_units`).
"""
#: attribute holding a unit's kind
UNIT_ATTR = '_mmbrecq_unit_kind'
#: attribute holding the names of a layer unit's tail modules (children of its parent)
TAIL_ATTR = '_mmbrecq_unit_tail'
