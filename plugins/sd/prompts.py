"""Conditions from a label space: the class prompts and their CLIP text embeddings.

A generator label is a position in the run's label space (``--dataset``), or an ImageNet-1K index for ImageNet
label spaces; either way it names a class, and the class name fills the prompt template. The three CLO
conditions are the class prompt's embedding (``class``), the empty prompt's (``null``: the unconditional input of
classifier-free guidance, as ``StableDiffusionPipeline`` builds it) and a zero text embedding (``zero``).

Embeddings are computed as ``StableDiffusionPipeline.encode_prompt`` does (tokens padded to the tokenizer's
``model_max_length``, the text encoder's last hidden state), once per class and one prompt at a time, so a class's
embedding does not depend on which classes were asked for together.
"""
from __future__ import annotations

import importlib.resources
import string
import sys
from pathlib import Path

import torch

from cao2core.errors import UserError
from cao2core.data.labels import LabelSpace, imagenet1k, label_space, read_pairs

DEFAULT_TEMPLATE = "a photo of a {name}"
FIELDS = ("name", "synonyms")    # {name}: the class name; {synonyms}: every ImageNet synonym (else the name)
SPACE_FILES = {"cifar10": "cifar10.txt", "cifar100": "cifar100.txt"}


def parse_template(text: str) -> str:
    """A ``--gen-opt prompt=`` template: Python format fields {name} and/or {synonyms}, nothing else."""
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise ValueError(f"not a template ({exc}); write the class as {{name}}, e.g. {DEFAULT_TEMPLATE!r}") from None
    unknown = sorted(used - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field {{{unknown[0]}}}; the fields are {{name}} and {{synonyms}}")
    if not used:
        raise ValueError(f"the template names no class, so every class would get the same prompt; put {{name}} in it, "
                         f"e.g. {DEFAULT_TEMPLATE!r}")
    return text


def shipped_spaces() -> dict:
    """The label spaces this plugin ships: {name: [(class id, class name), ...]} in the datasets' label order."""
    folder = importlib.resources.files(__package__) / "label_spaces"
    return {name: read_pairs(Path(str(folder / filename))) for name, filename in SPACE_FILES.items()}


class ClassNames:
    """Class name (and synonyms) of each generator label of a label space."""

    def __init__(self, space: LabelSpace):
        self.space = space
        self.imagenet = space.generator_space == "in1k"
        if self.imagenet:       # labels are ImageNet-1K indices; a class file's own names take precedence
            synonyms = imagenet1k()[1]
            own = dict(zip(space.generator_labels, space.names))
            self.names = [own.get(i, s.split(",")[0].strip()) for i, s in enumerate(synonyms)]
            self.synonyms = list(synonyms)
        else:
            self.names = list(space.names)
            self.synonyms = list(space.names)

    @classmethod
    def of_dataset(cls, dataset: str | None) -> "ClassNames":
        if not dataset:
            raise UserError("the sd generator is text-conditioned: pass --dataset (cifar10, cifar100, an ImageNet "
                            "label space such as in1k or nette, or a file with one class per line: ID NAME)")
        return cls(label_space(dataset, shipped_spaces()))

    def __len__(self) -> int:
        return len(self.names)

    def prompt(self, template: str, label: int) -> str:
        return template.format(name=self.names[label], synonyms=self.synonyms[label])


class TextConditions:
    """The prompt embeddings of a loaded pipeline, computed on first use and kept."""

    def __init__(self, tokenizer, text_encoder, names: ClassNames, template: str, device: torch.device):
        self.tokenizer, self.text_encoder, self.names, self.template = tokenizer, text_encoder, names, template
        self.device = device
        self.cache: dict[int, torch.Tensor] = {}
        self.null = self.encode("")

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """(tokens, width) text embedding of one prompt, as StableDiffusionPipeline.encode_prompt computes it."""
        tok = self.tokenizer
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        if len(tok(prompt).input_ids) > tok.model_max_length:
            print(f"cao2: sd: the prompt {prompt!r} is longer than the text encoder's {tok.model_max_length} tokens; "
                  "it reads the beginning only", file=sys.stderr)
        mask = ids.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) \
            else None
        return self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[0][0]

    def of_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, tokens, width): the class prompt's embedding of each label."""
        out = []
        for label in labels.tolist():
            if not 0 <= label < len(self.names):
                raise UserError(f"label {label} is outside the label space {self.names.space.name} "
                                f"({len(self.names)} classes)")
            if label not in self.cache:
                self.cache[label] = self.encode(self.names.prompt(self.template, label))
            out.append(self.cache[label])
        return torch.stack(out)

    def of_kinds(self, labels: torch.Tensor, kinds: list) -> torch.Tensor:
        """(B, tokens, width) per sample: ``class`` = its prompt, ``null`` = the empty prompt, ``zero`` = zeros."""
        rows = []
        for label, kind in zip(labels.view(-1, 1), kinds):
            if kind == "class":
                rows.append(self.of_labels(label)[0])
            elif kind == "null":
                rows.append(self.null)
            elif kind == "zero":
                rows.append(torch.zeros_like(self.null))
            else:
                raise UserError(f"unknown condition kind {kind!r}; use class, null or zero")
        return torch.stack(rows)
