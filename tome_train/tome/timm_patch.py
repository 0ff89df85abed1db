"""``apply_tome`` / ``remove_tome`` for timm ``VisionTransformer`` models.

The patch swaps classes in place (weights, names and ``state_dict`` are untouched):
every ``Block`` becomes a :class:`ToMeBlock` that merges tokens between attention and MLP,
every ``Attention`` a :class:`ToMeAttention`, and the model a subclass that resets the
per-forward state, weights average pooling by token size and unmerges the outputs of
``forward_intermediates`` back onto the patch grid.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from timm.layers.attention import Attention
from timm.models import VisionTransformer
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block

from . import kernels
from .attention import ToMeAttention, additive_mask
from .compile_modes import COMPILE_MODES
from .merge import Merge, match_keys, merge_wavg, merge_wavg_norm, merges_into_norm, unmerge_tokens
from .schedule import Schedule, parse_schedule


class UnsupportedModelError(TypeError):
    """A model, block or attention type the ToMe patch does not know how to merge."""


def attention_branch(
    block: Block, x: torch.Tensor, attn_bias: torch.Tensor | None, size: torch.Tensor | None, with_keys: bool,
    while_attending: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual branch of a block's first half, ``attention(norm1(x))`` ``[B, N, C]`` (the block adds
    it to ``x``, or the merge does, reading both), and with ``with_keys`` the attention keys ``[B, H, N, Dh]``
    for the matching (:func:`.merge.match_keys` averages them over heads). ``while_attending``: see
    :class:`.attention.ToMeAttention`."""
    x_attn, keys = block.attn(block.norm1(x), attn_bias, size, while_attending)
    # the matching takes no gradient: detached, it adds no node to the autograd graph
    return block.drop_path1(block.ls1(x_attn)), keys.detach() if with_keys else None


def mlp_residual(block: Block, x: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
    """The second half of a block: ``x + mlp(norm2(x))`` ``[B, N, C]``, or with ``normed``, ``norm2(x)`` as the
    merge made it along (:func:`.merge.merge_wavg_norm`), ``x + mlp(normed)``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x) if normed is None else normed)))


def merging_first_half(
    x: torch.Tensor, block: Block, attn_bias: torch.Tensor | None, size: torch.Tensor | None, r: int,
    merge_size: torch.Tensor | None,
) -> tuple[torch.Tensor, Merge | None]:
    """A merging block's first half, eagerly: the attention branch ``[B, N, C]`` (``size``: for proportional
    attention), then the merge of ``r`` tokens its keys plan (:func:`.merge.match_keys`, weighted by ``merge_size``)."""
    branch, keys = attention_branch(block, x, attn_bias, size, True)
    return branch, match_keys(keys, r, block._tome_state.num_protected, merge_size, x.dtype)


def merging_first_half_plan_beside(
    x: torch.Tensor, block: Block, attn_bias: torch.Tensor | None, size: torch.Tensor | None, r: int,
    merge_size: torch.Tensor | None,
) -> tuple[torch.Tensor, Merge | None]:
    """:func:`merging_first_half` with the plan on a second CUDA stream, queued as soon as the keys exist and awaited
    before the merge: the plan is latency-bound (one program per image, ViT-B 0.9 ms over its layers at batch 256 on
    an H100) and may run on what attention and the output projection leave of the GPU."""
    merges = []

    def plan(keys: torch.Tensor) -> None:
        with kernels.on_side_stream(x.device):
            merges.append(match_keys(keys, r, block._tome_state.num_protected, merge_size, x.dtype))

    branch, _ = attention_branch(block, x, attn_bias, size, False, plan)
    kernels.join_side_stream(x.device)
    return branch, merges[0]


def _merge_rows_of(merge: Merge | None) -> tuple[torch.Tensor, ...]:
    return () if merge is None else (merge.perm, merge.dest, *merge.known_weights)


def same_first_half(args: tuple, expected: tuple, candidate: tuple) -> bool:
    """Whether two first halves give the same branch (to rounding) and exactly the same merge."""
    (branch, merge), (other_branch, other_merge) = expected, candidate
    return (kernels.same_to_rounding(args, branch, other_branch)
            and kernels.identical(args, _merge_rows_of(merge), _merge_rows_of(other_merge)))


# On a GPU, in inference, the plan beside attention where that measures faster for the layer's shapes (see .kernels)
_merging_first_half = kernels.FastestPath(merging_first_half, merging_first_half_plan_beside, agree=same_first_half)


def plans_beside_attention(state: "ToMeState", x: torch.Tensor) -> bool:
    """Whether a merging block may plan its merge on a second stream while attention runs: without a gradient, where
    that may be chosen (:meth:`kernels.FastestPath.applies`: eagerly, on a GPU), outside compiled regions and
    CUDA-graph captures (a capture runs the plan after attention)."""
    return (state.compile_mode is None and not torch.is_grad_enabled() and _merging_first_half.applies(x.device)
            and not kernels.capturing(x.device))


@dataclass
class ToMeState:
    """Settings of a patched model and what one forward pass carries from block to block.

    ``in_pass`` whether the model's ``forward_features`` or ``forward_intermediates`` is running its blocks (outside,
    a block is timm's: :class:`ToMeBlock`); ``size`` ``[B, N, 1]`` tokens held by each token (``None``: all ones),
    ``source`` ``[B, N, N0]`` which input tokens each token holds (when traced), ``attn_mask`` the
    caller's mask as an additive bias merged along with the tokens, ``merging`` whether this
    forward merges: only batches of at least ``min_batch`` images do (smaller ones run as the
    unpatched model, where matching would cost more than the tokens it removes save);
    ``compile_mode`` the ``torch.compile`` mode of the block halves (:func:`compile_tome`; ``None``: eager).
    """

    schedule: list[int]
    prop_attn: bool
    trace_source: bool
    num_protected: int
    min_batch: int = 1
    compile_mode: str | None = None
    merging: bool = True
    in_pass: bool = False
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    layer_sources: list | None = field(default=None, repr=False)
    _compiled: dict = field(default_factory=dict, repr=False)
    _built_ahead: set = field(default_factory=set, repr=False)  # the first steps whose kernels were built ahead

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, e.g. an EMA model) and pickles keep the settings only: the
        per-forward tensors belong to the last forward pass (and may hold its autograd graph), the
        compiled regions to this process."""
        state = dict(self.__dict__)
        # merging too: after a torch.export with a dynamic batch it is the export's symbolic value, which no copy takes
        state.update(merging=True, in_pass=False, size=None, source=None, attn_mask=None, layer_sources=None,
                     _compiled={}, _built_ahead=set())
        return state

    def regions(self) -> tuple[Callable, Callable]:
        """:func:`attention_branch` and :func:`mlp_residual`, compiled in ``compile_mode`` if set."""
        if self.compile_mode is None:
            return attention_branch, mlp_residual
        if self.compile_mode not in self._compiled:
            # one graph per region for every block and token count: the token count is a dynamic dim
            self._compiled[self.compile_mode] = tuple(
                torch.compile(fn, mode=self.compile_mode, dynamic=True) for fn in (attention_branch, mlp_residual)
            )
        return self._compiled[self.compile_mode]

    def begin(self, batch_size: int, attn_mask: torch.Tensor | None = None, record_sources: bool = False) -> None:
        """Start a pass (:attr:`in_pass`, until :meth:`end`) of ``batch_size`` images, with the additive mask
        ``attn_mask``."""
        self.in_pass = True
        self.merging = any(self.schedule) and batch_size >= self.min_batch
        self.size = None
        self.source = None
        self.attn_mask = attn_mask
        self.layer_sources = [] if record_sources else None

    def end(self) -> None:
        """End the pass: its ``size`` and ``source`` stay, for ``forward_head`` and :func:`tome_state`."""
        self.in_pass = False

    @property
    def tracing(self) -> bool:
        return self.trace_source or self.layer_sources is not None

    def merge_mask(self, merge: Merge) -> None:
        """Merge the pass's additive mask ``[B|1, H|1, N, N]`` along with the tokens into ``[B, H|1, N - r, N - r]``: a
        merged query or key keeps the largest bias of the tokens it holds (it may attend, or be attended, where one of
        them may)."""
        m = self.attn_mask
        m = m.expand(merge.num_images, *m.shape[1:])
        m = merge(m.transpose(1, 2), mode="amax").transpose(1, 2)  # queries
        self.attn_mask = merge(m.permute(0, 3, 1, 2), mode="amax").permute(0, 2, 3, 1)  # keys


class ToMeBlock(Block):
    """timm ``Block`` with a token merge between attention and MLP."""

    _tome_state: ToMeState
    _tome_layer: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N - r, C]`` in its model's pass, ``[B, N, C]`` as timm's block outside one.

        The model's ``forward_features`` and ``forward_intermediates`` start each pass (the tokens' sizes, the mask)
        and run the blocks, which merge by the schedule and take the mask from the pass, merged along with the tokens
        (timm hands each block the caller's ``attn_mask`` and ``is_causal``, unmerged). Called outside a pass (a loop
        over ``model.blocks``, or a checkpointed block run again in the backward pass) a block has no merge state to
        go by and computes what timm's block does: no merge, no sizes, ``attn_mask`` (bool: may attend) and
        ``is_causal`` as given."""
        state = self._tome_state
        attend, feed_forward = state.regions()
        if not state.in_pass:
            branch, _ = attend(self, x, additive_mask(attn_mask, x.shape[1], is_causal, x.device), None, False)
            return feed_forward(self, x + branch)
        if state.size is not None and state.size.shape[:2] != x.shape[:2]:
            raise ValueError(f"a ToMe block got {x.shape[0]} x {x.shape[1]} tokens where the pass it is in has "
                             f"{state.size.shape[0]} x {state.size.shape[1]}: only the model's forward_features and "
                             "forward_intermediates run the blocks of a pass")
        size = state.size if state.prop_attn else None
        r = state.schedule[self._tome_layer] if state.merging else 0
        if r > 0 and plans_beside_attention(state, x):
            branch, merge = _merging_first_half(x, self, state.attn_mask, size, r, state.size)
        else:
            branch, keys = attend(self, x, state.attn_mask, size, r > 0)
            merge = match_keys(keys, r, state.num_protected, state.size, x.dtype) if r > 0 else None
        normed = None
        if merge is None:
            x = x + branch
        else:
            if state.tracing and state.source is None:
                state.source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
            if merges_into_norm(self.norm2, x, branch):
                x, state.size, state.source, normed = merge_wavg_norm(
                    merge, x, state.size, self.norm2, state.source, branch)
            else:
                x, state.size, state.source = merge_wavg(merge, x, state.size, state.source, branch)
            if state.attn_mask is not None:
                state.merge_mask(merge)
        if state.layer_sources is not None:
            state.layer_sources.append(state.source)
        return feed_forward(self, x, normed)


def checkpointed_blocks(blocks: torch.nn.Module) -> tuple[str, str] | None:
    """The name (``blocks``, ``blocks.0``, ...) and class of the first activation-checkpointing wrapper that holds a
    ToMe block (``apply_activation_checkpointing``, Lightning's FSDP ``activation_checkpointing_policy``, which wraps
    inside FSDP's own wrapper), or ``None``.

    Such a wrapper re-runs its blocks in the backward pass, outside the model's pass: as timm's blocks, on the tokens
    before the merge, which torch then rejects deep in the backward (a different count of saved tensors, or a
    gradient of another shape). A wrapper around a part of a block (its MLP) re-runs no merge and is allowed."""
    # a block can only be wrapped once the module is imported: importing it here would cost every pass
    wrappers = sys.modules.get("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    if wrappers is None:
        return None
    unvisited = [("blocks", blocks)]
    while unvisited:  # down to the ToMe blocks, not into them: a training pass pays for a dozen modules, not hundreds
        name, module = unvisited.pop()
        if isinstance(module, ToMeBlock):
            continue
        if isinstance(module, wrappers.CheckpointWrapper) and any(isinstance(m, ToMeBlock) for m in module.modules()):
            return name, type(module).__name__
        unvisited += [(f"{name}.{child_name}", child) for child_name, child in reversed(list(module.named_children()))]
    return None


class ToMeVisionTransformerMixin:
    """Overrides of the timm ``VisionTransformer`` entry points for a ToMe-patched model."""

    _tome_state: ToMeState

    def __reduce_ex__(self, protocol):
        """Pickle (``torch.save(model)``, spawn-based multiprocessing) and deepcopy through the
        unpatched timm class: the patched class is made at run time and has no importable name."""
        return _new_patched, (_unpatched_class(type(self)),), self.__getstate__()

    def _tome_begin(self, images: torch.Tensor, x_attn_mask, is_causal: bool, record_sources: bool = False) -> None:
        # else the pass fails first, inside the patch, on the device of an array (a string) or a list (none)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images of type {type(images).__name__} are not allowed: use a tensor [B, C, H, W]")
        if x_attn_mask is not None and not isinstance(x_attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask of type {type(x_attn_mask).__name__} is not allowed: use a tensor "
                            "(bool: may attend, or an additive float bias) or None")
        state = self._tome_state
        num_tokens = self.num_prefix_tokens
        if is_causal:
            grid = self.patch_embed.dynamic_feat_size(images.shape[-2:])
            num_tokens += grid[0] * grid[1]
        mask = additive_mask(x_attn_mask, num_tokens, is_causal, images.device)
        state.begin(images.shape[0], mask, record_sources)
        if state.merging and is_causal:
            raise ValueError("is_causal=True cannot be combined with token merging (r > 0)")
        if state.merging and self.grad_checkpointing and torch.is_grad_enabled():
            raise ValueError("gradient checkpointing re-runs blocks and cannot carry merge state; disable it or use r=0")
        if state.merging and torch.is_grad_enabled():
            wrapped = checkpointed_blocks(self.blocks)
            if wrapped is not None:
                raise ValueError(f"{wrapped[0]} is a {wrapped[1]}, which re-runs its blocks in the backward pass and "
                                 "cannot replay their merge: unwrap the blocks or use r=0")

    def _tome_build_ahead(self, images: torch.Tensor) -> bool:
        """Before the first step of its kind (input shape and dtype, autocast dtype, gradient or not, schedule) on a
        device where the fused kernels are chosen, the kernels that step's choices will build are built in parallel
        (:func:`.kernels.build_ahead`): one more pass of the step, forward and, where a gradient is on, backward to a
        copy of the images (no parameter gets a gradient), running PyTorch's ops. Forward hooks see it too. Returns
        whether it ran (not where the kernels are interpreted: nothing to build)."""
        state = self._tome_state
        device = images.device
        if torch.compiler.is_compiling() or not state.merging or not kernels.may_choose(device):
            return False
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        step = (device, tuple(images.shape), images.dtype, autocast, torch.is_grad_enabled(), tuple(state.schedule),
                state.prop_attn)
        if step in state._built_ahead:
            return False
        state._built_ahead.add(step)
        features = super().forward_features

        def first_pass() -> None:
            if torch.is_grad_enabled():
                leaf = images.detach().requires_grad_()
                torch.autograd.grad(features(leaf).float().sum(), leaf)
            else:
                features(images)

        return kernels.build_ahead(first_pass, device)

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        try:
            self._tome_begin(x, attn_mask, is_causal)
            if self._tome_build_ahead(x):
                self._tome_begin(x, attn_mask, is_causal)  # afresh: the pass ahead merged along
            # timm gets the mask too, though the blocks take it from the pass: with a mask timm checkpoints no block,
            # and a checkpointed block runs again in the backward pass, outside this pass, as timm's block without one
            return super().forward_features(x, attn_mask, is_causal)
        finally:
            self._tome_state.end()

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """timm's ``pool`` of the final features ``x`` ``[B, N, C]`` -> ``[B, C]`` (``global_pool=''``: ``x`` as it
        is), an average weighting each token by its size ``[B, N, 1]`` from the last ``forward_features``: a merged
        token counts as the tokens it holds."""
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._tome_state.size
        if size is None or pool_type in ("token", "", "max"):
            return super().pool(x, pool_type)
        if size.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"features of {x.shape[0]} images x {x.shape[1]} tokens do not come from the last forward_features "
                f"({size.shape[0]} x {size.shape[1]}): call forward_head right after forward_features"
            )
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        x, size = x[:, start:], size[:, start:].to(x.dtype)
        avg = (x * size).sum(dim=1) / size.sum(dim=1)
        if pool_type == "avg":
            return avg
        if pool_type == "avgmax":
            return 0.5 * (x.amax(dim=1) + avg)
        raise UnsupportedModelError(
            f"global_pool={pool_type!r} is not supported by ToMe: use token, avg, avgmax or max"
        )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices=None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask=None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates``; patch tokens are unmerged onto the input grid.

        The intermediates (patch tokens, and prefix tokens when asked) have timm's shapes; the
        final features stay merged, as ``forward_head`` (size-weighted pooling) expects them.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not allowed: use NCHW or NLC")
        try:
            self._tome_begin(x, attn_mask, is_causal, record_sources=True)
            result = super().forward_intermediates(  # the mask too: see forward_features
                x, indices, return_prefix_tokens=True, norm=norm, stop_early=stop_early,
                output_fmt="NLC", intermediates_only=False, output_dict=True, attn_mask=attn_mask, is_causal=is_causal,
            )
        finally:
            self._tome_state.end()
        take_indices, _ = feature_take_indices(len(self.blocks), indices)
        p = self.num_prefix_tokens
        sources = [self._tome_state.layer_sources[i] for i in take_indices]
        prefixes = result.get("image_intermediates_prefix", [y[:, :0] for y in result["image_intermediates"]])
        features = []
        for y, prefix, source in zip(result["image_intermediates"], prefixes, sources):
            if source is not None:
                y = unmerge_tokens(y, source[:, p:, p:])
            features.append(y)
        if output_fmt == "NCHW":
            grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])
            # the channels spelled out, not -1: an empty batch has no elements to infer them from
            features = [y.reshape(y.shape[0], *grid, y.shape[-1]).permute(0, 3, 1, 2).contiguous() for y in features]
        if output_dict:
            out = {"image_intermediates": features}
            if p and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                out["image_features"] = result["image_features"]
            return out
        if p and return_prefix_tokens:
            features = list(zip(features, prefixes))
        return features if intermediates_only else (result["image_features"], features)


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"ToMe{cls.__name__}", (ToMeVisionTransformerMixin, cls), {})
    return _PATCHED_CLASSES[cls]


def _unpatched_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if c is not ToMeVisionTransformerMixin)


def _new_patched(base: type) -> torch.nn.Module:
    """An empty instance of the patched ``base`` class (unpickling fills in its state)."""
    cls = _patched_class(base)
    return cls.__new__(cls)


def is_patched(model: torch.nn.Module) -> bool:
    return isinstance(model, ToMeVisionTransformerMixin)


def _check_supported(model: torch.nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer: ToMe patches most vit_*, deit_* and deit3_* "
            "models (not those timm builds on another class, such as the Eva-based vit_*_rope_*)"
        )
    if model.attn_pool is not None:
        raise UnsupportedModelError(f"global_pool={model.global_pool!r} (attention pooling) is not supported by ToMe: "
                                    "use token, avg, avgmax, max or ''")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, ToMeBlock):
            raise UnsupportedModelError(f"blocks[{i}] is a {type(blk).__name__}: ToMe supports timm Block only")
        if type(blk.attn) not in (Attention, ToMeAttention):
            raise UnsupportedModelError(
                f"blocks[{i}].attn is a {type(blk.attn).__name__}: ToMe supports timm Attention only"
            )


def apply_tome(
    model: VisionTransformer,
    r: Schedule = 0,
    prop_attn: bool = True,
    trace_source: bool = False,
    min_batch: int = 1,
) -> VisionTransformer:
    """Patch a timm ``VisionTransformer`` in place to merge tokens by schedule ``r``.

    Args:
        model: a timm ViT (plain, DeiT, distilled DeiT, DeiT-III, qk-norm, registers, avg pool).
        r: constant ``int``, ``(r, inflect)`` tuple or per-layer list (see :mod:`.schedule`).
        prop_attn: add ``log(size)`` of each key to the attention logits.
        trace_source: keep the ``[B, N, N0]`` source map of every forward (for visualizations).
        min_batch: merge only batches of at least this many images; smaller batches run unmerged
            (``r = 0``), for devices where matching costs more than it saves at small batches
            (:func:`tome_train.bench.calibrate_min_batch` measures it).

    Returns the same model object, now patched. Calling it again updates the settings.
    """
    _check_supported(model)
    if isinstance(min_batch, bool) or not isinstance(min_batch, int) or min_batch < 1:
        raise ValueError(f"min_batch={min_batch!r} is not allowed: use an integer >= 1")
    for name, flag in (("prop_attn", prop_attn), ("trace_source", trace_source)):
        if not isinstance(flag, bool):  # a string such as "no" would count as on
            raise ValueError(f"{name}={flag!r} is not allowed: use True or False")
    state = ToMeState(
        schedule=parse_schedule(r, len(model.blocks)),
        prop_attn=prop_attn,
        trace_source=trace_source,
        num_protected=model.num_prefix_tokens,
        min_batch=min_batch,
    )
    model.__class__ = _patched_class(type(model)) if not is_patched(model) else type(model)
    model._tome_state = state
    for i, blk in enumerate(model.blocks):
        blk.__class__ = ToMeBlock
        blk.attn.__class__ = ToMeAttention
        blk._tome_state = state
        blk._tome_layer = i
    return model


def compile_tome(model: VisionTransformer, mode: str | None = "default") -> VisionTransformer:
    """Compile a patched model region by region, for a compile time close to the unpatched model's.

    ``torch.compile(model)`` works too (one graph, no recompilation), but every layer has its own
    token count and so its own kernels. Here the two halves of a block (:func:`attention_branch`,
    :func:`mlp_residual`) are compiled once each with a dynamic token count and shared by all
    blocks, while matching and merging run eagerly between them. ``mode`` is a ``torch.compile``
    mode (:data:`COMPILE_MODES`); ``None`` goes back to eager. Calling :func:`apply_tome` again resets it.
    """
    state = tome_state(model)
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"mode={mode!r} is not allowed: use one of {', '.join(COMPILE_MODES)} or None")
    state.compile_mode = mode
    return model


def set_r(model: VisionTransformer, r: Schedule) -> list[int]:
    """Change the merge schedule of a patched model; returns the per-layer counts."""
    if not is_patched(model):
        raise UnsupportedModelError("the model is not patched: call apply_tome first")
    model._tome_state.schedule = parse_schedule(r, len(model.blocks))
    return model._tome_state.schedule


def tome_state(model: VisionTransformer) -> ToMeState:
    """Settings and last-forward state (``size``, ``source``) of a patched model."""
    if not is_patched(model):
        raise UnsupportedModelError("the model is not patched: call apply_tome first")
    return model._tome_state


def remove_tome(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`apply_tome` in place; the model is the plain timm model again."""
    if not is_patched(model):
        return model
    model.__class__ = _unpatched_class(type(model))
    del model._tome_state
    for blk in model.blocks:
        blk.__class__ = Block
        blk.attn.__class__ = Attention
        del blk._tome_state, blk._tome_layer
    return model
