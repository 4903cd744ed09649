"""Sample order: TinyLLaVA_Factory's length-grouped batching, seeded per epoch.

`modality_length_grouped_indices` is the algorithm of the Factory's
tinyllava/train/tinyllava_trainer.py (from LLaVA): image and text-only samples are shuffled and
cut into megabatches of `world_size * batch_size` separately, each megabatch sorted longest
first and dealt to the ranks in chunks of even total length; the megabatches are shuffled
together, with the two leftovers joined at the end. Differences, each deliberate:

* every random draw uses one `torch.Generator` seeded with `seed + epoch` (the Factory used the
  global RNG for part of it), so every rank, a resumed run and a rerun see the same order;
* a dataset of one modality is grouped by length alone (the Factory asserted both exist);
* lengths are token counts including the image tokens (the Factory counted words).

The sampler yields indices for the whole dataset; accelerate hands rank r every r-th batch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal `indices` into `num_chunks` chunks of equal count, each to the shortest so far."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           generator: torch.Generator) -> list[int]:
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    megabatches = [sorted(indices[i:i + size], key=lambda j: lengths[j], reverse=True)
                   for i in range(0, len(indices), size)]
    return [i for mb in megabatches for chunk in split_to_even_chunks(mb, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    generator: torch.Generator) -> list[int]:
    """`lengths` > 0 for samples with an image, < 0 (minus the length) for text-only ones."""
    if any(length == 0 for length in lengths):
        raise ValueError("a sample of length 0 cannot be grouped")
    mm = [(i, n) for i, n in enumerate(lengths) if n > 0]
    lang = [(i, -n) for i, n in enumerate(lengths) if n < 0]
    if not mm or not lang:
        return length_grouped_indices([abs(n) for n in lengths], batch_size, world_size, generator)
    size = world_size * batch_size

    def grouped(pairs: list[tuple[int, int]]) -> list[list[int]]:
        ids, lens = zip(*pairs)
        order = [ids[i] for i in length_grouped_indices(lens, batch_size, world_size, generator)]
        return [order[i:i + size] for i in range(0, len(order), size)]

    mm_mb, lang_mb = grouped(mm), grouped(lang)
    leftover = mm_mb[-1] + lang_mb[-1]
    megabatches = mm_mb[:-1] + lang_mb[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if len(leftover) >= size:
        megabatches = [leftover[:size]] + megabatches
        leftover = leftover[size:]
    if leftover:
        megabatches.append(leftover)
    return [i for mb in megabatches for i in mb]


class LengthGroupedSampler(Sampler[int]):
    """Factory's `LengthGroupedSampler(group_by_modality=True)`, seeded by (seed, epoch)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))


class SeededRandomSampler(Sampler[int]):
    """A random permutation drawn from (seed, epoch): the same on every rank and on resume."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())
