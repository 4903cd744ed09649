"""`TinyLlavaForConditionalGeneration`: vision tower + connector + causal LM.

The public surface is TinyLLaVA_Factory's (tinyllava/model/modeling_tinyllava.py) so its users
feel at home: `encode_images(pixel_values) -> (B, N, hidden)`, `forward(input_ids,
attention_mask=None, images=None, labels=None)` with `-200` in `input_ids` where the image goes,
and `generate(inputs, images=...)` returning the new tokens only.

Reading and writing checkpoints (three layouts, safetensors only) lives in `checkpoint.py`;
`from_pretrained` / `save_pretrained` here delegate to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tinyllava_edge.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tinyllava_edge.model.configuration import TinyLlavaConfig
from tinyllava_edge.model.connector import Connector
from tinyllava_edge.model.llm import family_for
from tinyllava_edge.model.vision import VisionTower


class TinyLlavaPreTrainedModel(PreTrainedModel):
    config_class = TinyLlavaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _skip_keys_device_placement = "past_key_values"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The sub-models initialise themselves (their own post_init); only the connector is ours.
        if isinstance(module, nn.Linear) and getattr(module, "_tinyllava_connector", False):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()


class TinyLlavaForConditionalGeneration(TinyLlavaPreTrainedModel):
    def __init__(self, config: TinyLlavaConfig):
        super().__init__(config)
        family_for(config.text_config.model_type)  # unknown family: clear error before building
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.vision_tower = VisionTower(config.vision_config)
        self.connector = Connector(config.connector_type, config.vision_hidden_size, config.hidden_size)
        for module in self.connector.modules():
            if isinstance(module, nn.Linear):
                module._tinyllava_connector = True
        self.post_init()

    # -- embeddings, as the Factory exposes them ------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def tied_embeddings(self) -> bool:
        out = self.language_model.get_output_embeddings()
        return out is not None and out.weight is self.language_model.get_input_embeddings().weight

    # -- vision ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, hidden): tower, Factory feature selection, connector."""
        tower = next(self.vision_tower.parameters())  # the tower's, not the LLM's (an export may load it alone)
        pixel_values = pixel_values.to(device=tower.device, dtype=tower.dtype)
        features = self.vision_tower(
            pixel_values,
            layer=self.config.vision_feature_layer,
            strategy=self.config.vision_feature_select_strategy,
        )
        return self.connector(features)

    # -- splicing image features into the text --------------------------------------------
    @property
    def image_features_scale(self) -> float:
        """The factor image rows get in `inputs_embeds` (the LLM's own input-embedding scale, Gemma)."""
        from tinyllava_edge.model.llm import family_for

        if self.config.scale_image_features is False or not family_for(self.config.llm_family).scale_image_features:
            return 1.0
        return float(getattr(self.get_input_embeddings(), "scalar_embed_scale", 1.0))

    def prepare_inputs_for_multimodal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images: torch.Tensor | None,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Replace each -200 in `input_ids` (B, T) by the image's N feature rows.

        Returns (inputs_embeds (B, T', C), attention_mask, position_ids, labels), with the same
        conventions as the Factory: padding is dropped by `attention_mask` and re-applied on
        `padding_side` (default: the config's `tokenizer_padding_side`), sequences are cut to `tokenizer_model_max_length`, image rows
        get IGNORE_INDEX labels, and masks/labels stay None when they were None.
        """
        embed = self.get_input_embeddings()
        if images is None:
            if (input_ids == IMAGE_TOKEN_INDEX).any():
                raise ValueError("input_ids contain the image placeholder -200 but no images were given")
            return embed(input_ids), attention_mask, None, labels

        image_features = self.encode_images(images)  # (n_images, N, C)
        scale = self.image_features_scale
        if scale != 1.0:
            image_features = image_features * scale
        keep = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        full_labels = labels if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)

        image_of_row = self._assign_images(input_ids, keep, image_features.shape[0])

        rows: list[torch.Tensor] = []
        row_labels: list[torch.Tensor] = []
        for row, (ids, lab, m) in enumerate(zip(input_ids, full_labels, keep)):
            ids, lab = ids[m], lab[m]
            next_image = image_of_row[row]
            where = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            bounds = [-1] + where + [ids.shape[0]]
            text_ids = torch.cat([ids[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:])])
            text_emb = embed(text_ids)
            pieces, piece_labels, offset = [], [], 0
            for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                n = b - a - 1
                pieces.append(text_emb[offset : offset + n])
                piece_labels.append(lab[a + 1 : b])
                offset += n
                if k < len(where):
                    feats = image_features[next_image]
                    next_image += 1
                    pieces.append(feats.to(text_emb.dtype))
                    piece_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
            rows.append(torch.cat(pieces))
            row_labels.append(torch.cat(piece_labels))

        limit = self.config.tokenizer_model_max_length
        if limit:
            rows = [r[:limit] for r in rows]
            row_labels = [r[:limit] for r in row_labels]

        batch, width = len(rows), max(r.shape[0] for r in rows)
        hidden = rows[0].shape[-1]
        inputs_embeds = rows[0].new_zeros((batch, width, hidden))
        new_labels = torch.full((batch, width), IGNORE_INDEX, dtype=full_labels.dtype, device=input_ids.device)
        new_mask = torch.zeros((batch, width), dtype=torch.bool, device=input_ids.device)
        position_ids = torch.zeros((batch, width), dtype=torch.long, device=input_ids.device)
        left = (padding_side or self.config.tokenizer_padding_side) == "left"
        for i, (r, lab) in enumerate(zip(rows, row_labels)):
            n = r.shape[0]
            span = slice(width - n, width) if left else slice(0, n)
            inputs_embeds[i, span] = r
            new_labels[i, span] = lab
            new_mask[i, span] = True
            position_ids[i, span] = torch.arange(n, device=input_ids.device)

        out_mask = new_mask.to(attention_mask.dtype) if attention_mask is not None else None
        return inputs_embeds, out_mask, position_ids, (new_labels if labels is not None else None)

    @staticmethod
    def _assign_images(input_ids: torch.Tensor, keep: torch.Tensor, n_images: int) -> list[int]:
        """Index of the first image each row uses.

        Either one image per placeholder, taken in order, or one image per row (the Factory's
        collator gives text-only samples a dummy image, which their row then skips).
        """
        counts = [int(((ids == IMAGE_TOKEN_INDEX) & m).sum()) for ids, m in zip(input_ids, keep)]
        if n_images == sum(counts):
            starts, total = [], 0
            for c in counts:
                starts.append(total)
                total += c
            return starts
        if n_images == len(counts) and max(counts) <= 1:
            return list(range(len(counts)))
        raise ValueError(
            f"{n_images} images do not fit input_ids holding {sum(counts)} image placeholders "
            f"in {len(counts)} rows; give one image per placeholder or one per row"
        )

    # -- forward / generate ----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds, attention_mask, spliced_positions, labels = self.prepare_inputs_for_multimodal(
                input_ids, attention_mask, labels, images
            )
            if images is not None:
                position_ids = spliced_positions
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache if use_cache is not None else False,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy/sampled decoding from `inputs` (B, T) with -200 placeholders; new tokens only."""
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids with -200 placeholders, not inputs_embeds")
        if inputs is None:
            inputs = kwargs.pop("input_ids")
        # Decoding continues every row from its last position: pad on the left.
        if attention_mask is None and images is not None and inputs.shape[0] > 1:
            attention_mask = torch.ones_like(inputs)
        inputs_embeds, attention_mask, _, _ = self.prepare_inputs_for_multimodal(
            inputs, attention_mask, None, images, padding_side="left"
        )
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args: Any, **kwargs: Any) -> "TinyLlavaForConditionalGeneration":
        """Read a Factory, legacy TinyLLaVABench or HF LLaVA checkpoint directory (a Factory one whose
        LLM is stored GPTQ-quantized loads it through GPTQModel, on CPU: model/gptq.py).

        Keyword options are transformers' own; model/load_options.py says what each one does here
        (honoured: `dtype`/`torch_dtype` (a dtype, its name, or "auto" for the stored one),
        `device`/`device_map` (one device), `subfolder`, `output_loading_info`,
        `attn_implementation`; `revision`, `cache_dir`, `token`, `local_files_only`,
        `force_download` when `path` is a Hugging Face Hub repository id: tinyllava_edge/hub.py,
        safetensors only; a local folder of that name wins and is read as it is).
        """
        from tinyllava_edge.hub import resolve_model
        from tinyllava_edge.model.checkpoint import load_checkpoint
        from tinyllava_edge.model.load_options import resolve_options

        if args:
            raise TypeError("from_pretrained takes the checkpoint path and keyword options only")
        options = resolve_options(kwargs)
        # transformers' Auto classes pass revision="main" with a local folder too
        path = resolve_model(path, **options["hub"], folder_ignores_revision=True)
        folder = Path(path) / options["subfolder"] if options["subfolder"] else path
        model = load_checkpoint(folder, dtype=options["dtype"], device=options["device"])
        if options["attn_implementation"] is not None:
            model.language_model.set_attn_implementation(options["attn_implementation"])
        if options["output_loading_info"]:
            # the load is strict (checkpoint.load_state fails on any missing, unexpected or
            # mis-shaped weight), so a model that loaded has nothing to report
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **kwargs: Any) -> None:
        """Write the Factory layout (config.json + model.safetensors); other HF options are ignored."""
        from tinyllava_edge.model.checkpoint import save_checkpoint

        save_checkpoint(self, save_directory, state_dict=state_dict)
