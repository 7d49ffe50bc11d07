"""Model loading (timm) and ONNX export. Needs torch and timm (the ``compile`` extra)."""

from .models import LoadedModel, create_model, data_config, load_model, read_state_dict, state_dict_diff
from .onnx_export import (INPUT_NAME, OPSET, OUTPUT_NAME, check_onnx, export_onnx, module_name,
                          verify_against_torch)

__all__ = ["LoadedModel", "create_model", "data_config", "load_model", "read_state_dict", "state_dict_diff",
           "INPUT_NAME", "OUTPUT_NAME", "OPSET", "check_onnx", "export_onnx", "module_name", "verify_against_torch"]
