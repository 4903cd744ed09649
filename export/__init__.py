"""Exporters: vision+connector to ONNX, LLM to GGUF, mmproj, the edge bundle; built in the export issue."""
