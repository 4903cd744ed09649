"""The floors the issue sets, checked against one run's figures (bench-scale is where they apply).

Each floor compares two figures from the same run; a missing figure (a contender not run, or
failed) makes the floor "not measured", never "met". TTFT floors: against stock mtmd, the cold
TTFT of both (mtmd cannot reuse anything); the cached-image TTFT against the warm TTFT of the same
image's first question (both keep the system prompt; only the image differs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

EDGE_Q4 = "edge Q4_K_M / vision int8"


def _get(rows: Mapping[str, dict], name: str, key: str) -> float | None:
    row = rows.get(name)
    return None if row is None else row.get(key)


def _floor(what: str, value: float | None, limit: float, at_least: bool, detail: str) -> dict:
    met = None if value is None else (value >= limit if at_least else value <= limit)
    return {"floor": what, "value": value, "limit": limit, "at_least": at_least, "met": met, "detail": detail}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def check_floors(contenders: Sequence[dict]) -> list[dict]:
    rows = {r["name"]: r for r in contenders}
    floors = []
    q4 = _get(rows, EDGE_Q4, "decode_tokens_per_s")
    torch32 = _get(rows, "torch fp32", "decode_tokens_per_s")
    floors.append(_floor("edge Q4_K_M decode >= 6x torch fp32 eager", _ratio(q4, torch32), 6.0, True,
                         f"{EDGE_Q4} vs torch fp32 decode tok/s"))
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        ours = _get(rows, f"edge {quant} / vision fp32", "decode_tokens_per_s")
        raw = _get(rows, f"llama.cpp {quant} (text)", "decode_tokens_per_s")
        floors.append(_floor(f"our runtime decode >= 0.97x raw llama.cpp ({quant})", _ratio(ours, raw), 0.97, True,
                             f"edge {quant} / vision fp32 vs llama.cpp {quant} (text) decode tok/s"))
    for quant in ("Q4_K_M", "Q8_0"):
        fraction = _get(rows, f"edge {quant} / vision fp32", "roofline_fraction")
        floors.append(_floor(f"roofline fraction >= 0.6 ({quant})", fraction, 0.6, True,
                             f"edge {quant} decode tok/s x weight bytes per token / measured bandwidth"))
    for vision in ("int8", "fp32"):
        ours = _get(rows, f"edge Q4_K_M / vision {vision}", "ttft_ms")
        stock = _get(rows, "mtmd Q4_K_M", "ttft_ms")
        floors.append(_floor(f"TTFT image + question <= 0.8x stock mtmd (Q4_K_M, vision {vision})",
                             _ratio(ours, stock), 0.8, False,
                             f"edge Q4_K_M / vision {vision} vs mtmd Q4_K_M (mmproj Q8_0) cold TTFT"))
    cached = _get(rows, EDGE_Q4, "ttft_cached_ms")
    first = _get(rows, EDGE_Q4, "ttft_warm_ms")
    floors.append(_floor("TTFT with the image embedding cached <= 0.2x our first TTFT", _ratio(cached, first), 0.2,
                         False, f"{EDGE_Q4}: the same image again vs its first (warm) TTFT"))
    return floors
