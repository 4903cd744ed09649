"""Connectors (vision features -> LLM embeddings), a registry with exact keys.

Keys follow TinyLLaVA_Factory: `linear`, `mlp{N}x_gelu` (N >= 1 Linear layers with GELU between;
one registry entry for the whole `mlp{N}x_gelu` family), `identity`. Parameter names match the
released checkpoints: `connector._connector.{0,2,...}.{weight,bias}` (or `connector._connector.weight`
for `linear`).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.registry import Registry

# A builder takes (connector_type, vision width, LLM width) and returns the inner module.
CONNECTORS: Registry[Callable[[str, int, int], nn.Module]] = Registry("connector")

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


@CONNECTORS.register("linear")
def _linear(connector_type: str, vision_hidden: int, hidden: int) -> nn.Module:
    return nn.Linear(vision_hidden, hidden)


@CONNECTORS.register("mlp{N}x_gelu")
def _mlp(connector_type: str, vision_hidden: int, hidden: int) -> nn.Module:
    depth = int(_MLP.match(connector_type).group(1))
    if depth < 1:
        raise TinyLlavaError(f"connector {connector_type!r} needs at least one layer")
    layers: list[nn.Module] = [nn.Linear(vision_hidden, hidden)]
    for _ in range(depth - 1):
        # exact (erf) GELU, as nn.GELU() in the Factory; llama.cpp's mmproj uses the tanh form
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


@CONNECTORS.register("identity")
def _identity(connector_type: str, vision_hidden: int, hidden: int) -> nn.Module:
    if vision_hidden != hidden:
        raise TinyLlavaError(
            f"connector 'identity' needs the vision width ({vision_hidden}) to equal the LLM width ({hidden})"
        )
    return nn.Identity()


def connector_key(connector_type: str) -> str:
    """The registry key for a connector type string (`mlp2x_gelu` -> `mlp{N}x_gelu`)."""
    return "mlp{N}x_gelu" if _MLP.match(connector_type or "") else connector_type


class Connector(nn.Module):
    def __init__(self, connector_type: str, vision_hidden: int, hidden: int):
        super().__init__()
        build = CONNECTORS.get(connector_key(connector_type))
        self._connector = build(connector_type, vision_hidden, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, N, C_v) -> (B, N, C_llm)
        return self._connector(features)
