"""The ToMe core as a timm user takes it, without the framework: ``from tome_train.tome import ...`` on their own model,
with the wrappers and inputs such a user brings."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tome_train.tome import apply_tome, set_r, tome_state

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
IMG, PATCH = 32, 8
NUM_TOKENS = (IMG // PATCH) ** 2 + 1  # the patches and the class token


def tiny_vit(seed: int = 0) -> timm.models.VisionTransformer:
    """A 3-block ViT of 17 tokens, seeded weights."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, depth=3,
                             embed_dim=64, num_heads=4, num_classes=10)


def images(batch: int = 2) -> torch.Tensor:
    """``[batch, 3, IMG, IMG]``, the same on every call."""
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_the_core_imports_and_merges_without_the_framework():
    """The README's promise: torch and timm only. Lightning, wandb, omegaconf and the data libraries cannot be
    imported in this process (``None`` in ``sys.modules`` makes an import fail), and every public name loads."""
    code = """
import sys
for name in ("lightning", "pytorch_lightning", "lightning_fabric", "wandb", "omegaconf", "torchmetrics", "webdataset"):
    sys.modules[name] = None
import timm, torch
import tome_train.tome as tome
for name in tome.__all__:
    getattr(tome, name)
model = tome.apply_tome(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          depth=2, num_classes=10), r=3)
model(torch.randn(2, 3, 32, 32)).sum().backward()
print(tome.tome_state(model).size.shape[1])
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(NUM_TOKENS - 2 * 3)]


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the reentrant wrapper without a gradient
def test_activation_checkpointing_wrappers_are_refused_while_merging_with_a_gradient():
    """A block wrapped for activation checkpointing (``apply_activation_checkpointing``, Lightning's FSDP
    ``activation_checkpointing_policy``) runs again in the backward pass, outside the model's pass and so unmerged:
    the forward merged and the backward failed deep in torch (``CheckpointError``: a different number of saved
    tensors; reentrant: a gradient of another shape). It is one error at the forward, also where the wrapper is inside
    another (Lightning's FSDP wraps for checkpointing inside FSDP's own wrapper) or around all the blocks; at r=0, and
    without a gradient, the wrapped model runs as the unwrapped one; a wrapper around a block's MLP re-runs no merge."""
    wrappers = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")

    class Outer(torch.nn.Module):  # as FSDP wraps a block before the checkpointing wrapper goes in
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
            return self.inner(x, **kwargs)

    plain = tiny_vit().train()
    x = images()
    cases = [(wrappers.CheckpointImpl.NO_REENTRANT, "blocks.0", False),
             (wrappers.CheckpointImpl.REENTRANT, "blocks.0", False),
             (wrappers.CheckpointImpl.NO_REENTRANT, "blocks.0.inner", True),
             (wrappers.CheckpointImpl.NO_REENTRANT, "blocks", None)]
    for impl, where, outer in cases:
        model = apply_tome(copy.deepcopy(plain), r=2).train()
        if outer:
            model.blocks = torch.nn.Sequential(*(Outer(block) for block in model.blocks))
        wrappers.apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=lambda block: wrappers.checkpoint_wrapper(block, checkpoint_impl=impl),
            check_fn=(lambda module: module is model.blocks) if outer is None else
            (lambda module: isinstance(module, timm.models.vision_transformer.Block)))
        refusal = (rf"^{where} is a CheckpointWrapper, which re-runs its blocks in the backward pass and cannot "
                   r"replay their merge: unwrap the blocks or use r=0$")
        with pytest.raises(ValueError, match=refusal):
            model(x).sum().backward()
        if outer is None:  # the blocks are no Sequential any more: no schedule can be set on them
            continue
        with torch.no_grad():
            merged = apply_tome(copy.deepcopy(plain), r=2).eval()
            assert torch.equal(model.eval()(x), merged(x))
            assert tome_state(model).size.shape[1] == NUM_TOKENS - 2 * 3
        set_r(model, 0)
        grads = []
        for m in (plain, model.train()):
            m.zero_grad()
            m(x).square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        assert (grads[0] - grads[1]).abs().max().item() <= 1e-6

    grads = []
    for wrap in (False, True):
        model = apply_tome(copy.deepcopy(plain), r=2).train()
        if wrap:
            wrappers.apply_activation_checkpointing(
                model, check_fn=lambda module: isinstance(module, timm.layers.Mlp))
        model(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("entry", ["forward", "forward_features", "forward_intermediates"])
def test_input_that_is_no_tensor_is_one_type_error(entry):
    """An array or a list of images (and an array for a mask) failed inside the patch with an AttributeError
    (``'str' object has no attribute 'type'``: an array's device is a string) where timm names the argument types."""
    model = apply_tome(tiny_vit(), r=2).eval()
    run = getattr(model, entry)
    with pytest.raises(TypeError, match=r"^images of type ndarray are not allowed: use a tensor \[B, C, H, W\]$"):
        run(images().numpy())
    with pytest.raises(TypeError, match=r"^images of type list are not allowed"):
        run(list(images()))
    with pytest.raises(TypeError, match=r"^attn_mask of type ndarray is not allowed: use a tensor \(bool: may attend, "
                                        r"or an additive float bias\) or None$"):
        run(images(), attn_mask=np.ones((NUM_TOKENS, NUM_TOKENS), dtype=bool))
