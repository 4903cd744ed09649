"""Quantization to 4/8-bit for every backend; built in the quantization issue."""
