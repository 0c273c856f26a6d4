"""PaddleNLP model names -> their public Hugging Face conversions.

PaddleNLP names its built-in models without an organisation (`ernie-3.0-medium-zh`). The same weights are
published in Hugging Face format under `nghuyong/` (converted from the PaddleNLP release; ERNIE 3.0 keeps
`use_task_id`, `type_vocab_size: 4` and `layer_norm_eps: 1e-5`). Such a name is mapped with a message, and
fetched only where a hub is reachable; offline, the error says what to download and where to point `--model`.

| PaddleNLP name      | Hugging Face model            | layers x hidden |
| ------------------- | ----------------------------- | --------------- |
| ernie-3.0-xbase-zh  | nghuyong/ernie-3.0-xbase-zh   | 20 x 1024       |
| ernie-3.0-base-zh   | nghuyong/ernie-3.0-base-zh    | 12 x 768        |
| ernie-3.0-medium-zh | nghuyong/ernie-3.0-medium-zh  | 6 x 768         |
| ernie-3.0-mini-zh   | nghuyong/ernie-3.0-mini-zh    | 6 x 384         |
| ernie-3.0-micro-zh  | nghuyong/ernie-3.0-micro-zh   | 4 x 384         |
| ernie-3.0-nano-zh   | nghuyong/ernie-3.0-nano-zh    | 4 x 312         |
| ernie-1.0-base-zh   | nghuyong/ernie-1.0-base-zh    | 12 x 768        |
| ernie-1.0 (alias)   | nghuyong/ernie-1.0-base-zh    | 12 x 768        |
| ernie-2.0-base-en   | nghuyong/ernie-2.0-base-en    | 12 x 768        |
| ernie-2.0-large-en  | nghuyong/ernie-2.0-large-en   | 24 x 1024       |
| ernie-health-chinese| nghuyong/ernie-health-zh      | 12 x 768        |
"""

from __future__ import annotations

import os

PADDLE_TO_HF = {
    "ernie-3.0-xbase-zh": "nghuyong/ernie-3.0-xbase-zh",
    "ernie-3.0-base-zh": "nghuyong/ernie-3.0-base-zh",
    "ernie-3.0-medium-zh": "nghuyong/ernie-3.0-medium-zh",
    "ernie-3.0-mini-zh": "nghuyong/ernie-3.0-mini-zh",
    "ernie-3.0-micro-zh": "nghuyong/ernie-3.0-micro-zh",
    "ernie-3.0-nano-zh": "nghuyong/ernie-3.0-nano-zh",
    "ernie-1.0-base-zh": "nghuyong/ernie-1.0-base-zh",
    "ernie-1.0": "nghuyong/ernie-1.0-base-zh",
    "ernie-2.0-base-en": "nghuyong/ernie-2.0-base-en",
    "ernie-2.0-large-en": "nghuyong/ernie-2.0-large-en",
    "ernie-health-chinese": "nghuyong/ernie-health-zh",
}


def hub_offline() -> bool:
    """True when the user told Hugging Face libraries not to use the network."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_kwargs() -> dict:
    """from_pretrained options: the user's offline setting holds even when it was set after
    huggingface_hub read its environment."""
    return {"local_files_only": True} if hub_offline() else {}


def hub_name(name: str) -> str | None:
    """The Hugging Face id for a PaddleNLP model name, or None when the name is not one of them."""
    return PADDLE_TO_HF.get(name.strip().lower())
