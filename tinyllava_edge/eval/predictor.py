"""Predictors: what answers the questions. The runner needs only the :class:`Predictor` protocol,
so the edge runtime (ONNX + llama.cpp) plugs in beside :class:`TorchPredictor`.

:class:`TorchPredictor` answers as TinyLLaVA_Factory's ``model_vqa_loader.py`` does: the
question becomes ``"<image>\\n" + question`` when there is an image, is rendered with the chat
template of the LLM family (``default_template_for_family``), the image is preprocessed for the
checkpoint's tower, and decoding is greedy. :class:`RuntimePredictor` answers the same way through
``tinyllava_edge.runtime`` (a bundle: onnxruntime + llama.cpp, no torch; or a checkpoint). Unlike Factory (batch size 1) it decodes in
batches: the model pads on the left itself; rows are padded on the left here too, so text-only
batches decode correctly as well. torch is imported when a TorchPredictor is made, so the
protocol (and the runner) import without it. An answer ends at the first EOS token and is cut at the
template's stop strings, then stripped (Factory: ``batch_decode(..., skip_special_tokens=True)
.strip()``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Sequence, Union, runtime_checkable

from tinyllava_edge.constants import DEFAULT_IMAGE_TOKEN
from tinyllava_edge.errors import TinyLlavaError
from tinyllava_edge.hub import model_name

if TYPE_CHECKING:
    from PIL import Image

ImageLike = Union[str, "os.PathLike[str]", "Image.Image", None]

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 32  # benchmarks bring their own (Benchmark.max_new_tokens)


class Request(NamedTuple):
    """One question: an image (path, PIL image, or None for text only) and the question text
    without ``<image>``. Plain ``(image, question)`` tuples are accepted as well."""

    image: ImageLike
    question: str


@runtime_checkable
class Predictor(Protocol):
    """Answers questions greedily. ``batch_size`` is how many the runner hands over at once."""

    model_id: str
    batch_size: int

    def predict(self, requests: Sequence[Request | tuple[ImageLike, str]]) -> list[str]:
        """One answer string per request, in order."""
        ...


def _torch_device(device: str):
    """`device` as a torch device a checkpoint can run on; one sentence for anything else."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise TinyLlavaError(f"device {device!r} is not a torch device; a checkpoint runs on cpu, cuda or cuda:N "
                             "(auto and jetson are for bundles)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise TinyLlavaError(f"device {device!r} was asked for but torch sees no CUDA GPU here; use cpu")
    return parsed


class TorchPredictor:
    """A checkpoint directory (any layout ``from_pretrained`` reads) answering in batches."""

    def __init__(self, checkpoint_dir: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, dtype: Any = None, template: str | None = None,
                 allow_truncated_images: bool = False):
        from tinyllava_edge.data.preprocess import PreprocessConfig
        from tinyllava_edge.data.template import default_template_for_family, get_template
        from tinyllava_edge.model import TinyLlavaForConditionalGeneration, load_tokenizer

        if batch_size < 1:
            raise TinyLlavaError(f"batch size must be at least 1, got {batch_size}")
        if max_new_tokens < 1:
            raise TinyLlavaError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        path = Path(checkpoint_dir)
        if not path.is_dir():
            raise TinyLlavaError(f"checkpoint {path} is not a directory; expected a model saved by tinyllava-edge "
                                 "or a released TinyLLaVA checkpoint")
        self.device = _torch_device(device)
        self.model = TinyLlavaForConditionalGeneration.from_pretrained(path, device=self.device, dtype=dtype)
        self.tokenizer = load_tokenizer(path)
        config = self.model.config
        self.template = get_template(template or default_template_for_family(config.llm_family))
        vision = config.vision_config
        self.preprocess_config = PreprocessConfig.for_tower(vision.model_type, vision.image_size,
                                                            config.image_aspect_ratio)
        self.model_id = model_name(path)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.allow_truncated_images = allow_truncated_images  # as tinyllava_edge.load's (data/images.py)
        self._stop_ids = self._stop_token_ids()
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self._stop_ids[0]

    def _stop_token_ids(self) -> list[int]:
        """EOS plus every stop string that is a single token of the vocabulary."""
        tok = self.tokenizer
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        vocab = tok.get_vocab()
        ids += [vocab[s] for s in self.template.stop if s in vocab and vocab[s] not in ids]
        if not ids:
            raise TinyLlavaError(f"tokenizer of {self.model_id} has no EOS token and no stop token of "
                                 f"template {self.template.name!r}; greedy decoding would never stop")
        return ids

    def predict(self, requests: Sequence[Request | tuple[ImageLike, str]]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            answers += self._batch([Request(*r) for r in requests[start:start + self.batch_size]])
        return answers

    def _batch(self, batch: list[Request]) -> list[str]:
        import torch

        from tinyllava_edge.data.preprocess import preprocess

        prompts = [self.template.encode(
            [{"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{r.question}" if r.image is not None else r.question}],
            self.tokenizer, mode="eval")["input_ids"] for r in batch]
        width = max(len(ids) for ids in prompts)
        # (B, T) left-padded ids and their mask; -200 marks where each row's image goes
        input_ids = torch.tensor([[self._pad_id] * (width - len(ids)) + ids for ids in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        images = [r.image for r in batch if r.image is not None]
        pixels = None
        if images:
            dtype = next(self.model.parameters()).dtype
            pixels = preprocess(images, self.preprocess_config, allow_truncated=self.allow_truncated_images)
            pixels = torch.from_numpy(pixels).to(self.device, dtype)  # (n, 3, H, W)
        out = self.model.generate(
            input_ids.to(self.device), images=pixels, attention_mask=mask.to(self.device),
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=self._stop_ids, pad_token_id=self._pad_id,
        )  # (B, new tokens)
        return [self._decode(row) for row in out.tolist()]

    def _decode(self, ids: list[int]) -> str:
        stops = set(self._stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        for stop in self.template.stop:
            if stop:
                text = text.split(stop, 1)[0]
        return text.strip()


class RuntimePredictor:
    """A bundle (or a checkpoint) through ``tinyllava_edge.runtime.load``: greedy, the batch's
    images through the vision encoder together, the answers one after another (one KV cache).

    ``device`` is the runtime's (auto, cpu, cuda, jetson); ``options`` go to ``load`` (e.g.
    ``n_threads``, ``kv_type``, ``allow_truncated_images``). Answers are cut at the template's stop strings and stripped, as
    TorchPredictor's.
    """

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, template: str | None = None, **options: Any):
        from tinyllava_edge.runtime import load

        if batch_size < 1:
            raise TinyLlavaError(f"batch size must be at least 1, got {batch_size}")
        if max_new_tokens < 1:
            raise TinyLlavaError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if template is not None:
            options["template"] = template
        self.vlm = load(model_dir, device=device, vision_batch_size=batch_size, **options)
        self.template = self.vlm.template
        self.model_id = self.vlm.model_id
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def predict(self, requests: Sequence[Request | tuple[ImageLike, str]]) -> list[str]:
        # The template removes "<image>" from a question and puts one in front; the runtime
        # places the image itself, so a stray marker in a question file is dropped here.
        pairs = [(r[0], r[1].replace(DEFAULT_IMAGE_TOKEN, "").strip()) for r in requests]
        texts = self.vlm.generate_batch(pairs, max_new_tokens=self.max_new_tokens, temperature=0.0)
        return [t.strip() for t in texts]
