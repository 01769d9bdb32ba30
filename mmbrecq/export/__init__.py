"""Exports of a quantized model: integer checkpoint, float checkpoint with baked weights, ONNX QDQ."""
from .int_checkpoint import (
                             bake_float_checkpoint,
                             load_integer_checkpoint,
                             read_integer_checkpoint,
                             save_integer_checkpoint,
                             to_integer_checkpoint,
)
from .onnx_qdq import export_onnx, onnxruntime_session, qdq_export_mode, qdq_node_counts

__all__ = [
    'to_integer_checkpoint', 'save_integer_checkpoint', 'read_integer_checkpoint', 'load_integer_checkpoint',
    'bake_float_checkpoint', 'export_onnx', 'onnxruntime_session', 'qdq_export_mode', 'qdq_node_counts'
]
