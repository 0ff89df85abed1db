"""Merge schedules: how many tokens each layer removes, and what that buys in FLOPs.

A schedule is one of
- ``int r``: remove ``r`` tokens in every layer (the paper's constant schedule);
- a tuple ``(r, inflect)``: linear from ``r * (1 - inflect)`` to ``r * (1 + inflect)``; ``inflect=-1``
  is the paper's decreasing schedule (``2r`` in the first layer down to ``0`` in the last);
- a list of per-layer counts (shorter than the depth: the remaining layers merge nothing).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence as AbcSequence
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

Schedule = Union[int, Sequence[int], tuple]


def max_merges(num_tokens: int, num_protected: int) -> int:
    """The 50% cap: at most half of the unprotected tokens can merge in one layer."""
    return max((num_tokens - num_protected) // 2, 0)


class BipartiteSets(NamedTuple):
    """The two sets of a layer's matching over ``num_tokens`` tokens: the tokens at even positions (set A, ``num_a``
    of them from ``a_start``) and at odd positions (set B, ``num_b`` from ``b_start``), as the paper's code splits
    them (``a, b = x[::2], x[1::2]``), the protected prefix in neither."""

    num_a: int
    a_start: int
    num_b: int
    b_start: int


def bipartite_sets(num_tokens: int, num_protected: int) -> BipartiteSets:
    """:class:`BipartiteSets` of a layer of ``num_tokens`` tokens whose first ``num_protected`` never merge."""
    a_start = num_protected + num_protected % 2
    num_a = (num_tokens - a_start + 1) // 2
    return BipartiteSets(num_a, a_start, num_tokens - num_protected - num_a, num_protected + 1 - num_protected % 2)


class ScheduleError(ValueError):
    """A schedule that no ViT of the given depth can take."""


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ScheduleError(f"{what}={value!r} is not allowed: use a non-negative integer")
    return int(value)


def parse_schedule(r: Schedule, depth: int) -> list[int]:
    """Per-layer merge counts for a model with ``depth`` blocks."""
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ScheduleError(f"r={r!r} is not allowed: a tuple schedule is (r, inflect)")
        base, inflect = r
        base = _check_count(base, "r")
        if isinstance(inflect, bool) or not isinstance(inflect, numbers.Real) or not -1.0 <= float(inflect) <= 1.0:
            raise ScheduleError(f"inflect={inflect!r} is not allowed: use a number in [-1, 1]")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / max(depth - 1, 1)
        return [int(lo + step * i) for i in range(depth)]
    if isinstance(r, AbcSequence) and not isinstance(r, (str, bytes)):  # list, ListConfig
        counts = [_check_count(v, f"r[{i}]") for i, v in enumerate(r)]
        if len(counts) > depth:
            raise ScheduleError(
                f"r schedule of length {len(counts)} is not allowed: the model has {depth} blocks"
            )
        return counts + [0] * (depth - len(counts))
    return [_check_count(r, "r")] * depth


def token_counts(schedule: Sequence[int], num_tokens: int, num_protected: int) -> list[int]:
    """Tokens entering each block, plus the count after the last one (``len = depth + 1``).

    Each block removes ``min(r_l, cap)`` tokens where the cap is half its unprotected tokens.
    """
    counts = [num_tokens]
    for r in schedule:
        n = counts[-1]
        counts.append(n - min(r, max_merges(n, num_protected)))
    return counts


@dataclass(frozen=True)
class ViTDims:
    """What the FLOP count of a plain ViT depends on."""

    embed_dim: int
    depth: int
    num_patches: int
    num_protected: int
    patch_size: int
    in_chans: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 1000

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block: the patches and the protected prefix (class and register tokens)."""
        return self.num_patches + self.num_protected

    def tokens_per_layer(self, schedule: Sequence[int]) -> list[int]:
        """:func:`token_counts` of this model under ``schedule``: tokens entering each block, and after the last."""
        return token_counts(schedule, self.num_tokens, self.num_protected)

    @classmethod
    def from_timm(cls, model) -> "ViTDims":
        patch = model.patch_embed.patch_size
        mlp_hidden = model.blocks[0].mlp.fc1.out_features
        return cls(
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_patches=model.patch_embed.num_patches,
            num_protected=model.num_prefix_tokens,
            patch_size=patch[0] * patch[1] if isinstance(patch, tuple) else patch * patch,
            in_chans=model.patch_embed.proj.in_channels,
            mlp_ratio=mlp_hidden / model.embed_dim,
            num_classes=max(getattr(model, "num_classes", 0), 0),
        )


def vit_flops(dims: ViTDims, schedule: Schedule | None = None, blocks_only: bool = False) -> float:
    """Forward FLOPs of one image through a ViT under a merge schedule (any form :func:`parse_schedule` takes:
    ``r``, ``(r, inflect)``, a per-layer list; ``None``: no merging).

    Counted as the paper does (fvcore: one multiply-add is one FLOP), so ViT-B/16 at 224 is
    17.6 GFLOPs and DeiT-S 4.6 (3.4 at r=8, 2.3 at r=16); twice this is the count of
    multiplications plus additions.

    Attention (qkv, q @ k, attn @ v, proj) runs on the tokens entering a block, the MLP on
    those left after its merge. Matching costs are not counted: this is the bound a merge
    schedule can reach. ``blocks_only`` leaves out the patch embedding and the head (the
    transformer blocks alone, as in speed-up bounds such as ViT-B/16 r16 2.02x).
    """
    d, depth = dims.embed_dim, dims.depth
    schedule = parse_schedule(schedule if schedule is not None else 0, depth)
    counts = dims.tokens_per_layer(schedule)
    mlp_hidden = int(round(d * dims.mlp_ratio))
    macs = 0
    for n_in, n_out in zip(counts[:-1], counts[1:]):
        macs += 4 * n_in * d * d + 2 * n_in * n_in * d  # qkv + proj, q @ k and attn @ v
        macs += 2 * n_out * d * mlp_hidden  # fc1 + fc2
    if not blocks_only:
        macs += dims.num_patches * dims.patch_size * dims.in_chans * d  # patch embedding
        macs += d * dims.num_classes  # head
    return float(macs)


def flop_bound(dims: ViTDims, schedule: Schedule) -> float:
    """The speed-up ``schedule`` would give if time followed FLOPs: the transformer blocks' FLOPs without merging over
    theirs with it (the blocks only, as the paper's bounds count: ViT-S/16 r13 1.72x, ViT-B/16 r16 2.02x)."""
    return vit_flops(dims, blocks_only=True) / vit_flops(dims, schedule, blocks_only=True)


def check_fits(r: Schedule, dims: ViTDims) -> list[int]:
    """:func:`parse_schedule` of ``r`` for the model of ``dims``, refused where it asks a layer for more merges than
    any layer of the model can make (half of the patch tokens entering the first block). The core caps such an r, as
    the paper's code does; where a user names the r of a run, it is a typo."""
    schedule = parse_schedule(r, dims.depth)
    cap = max_merges(dims.num_tokens, dims.num_protected)
    if max(schedule, default=0) > cap:
        raise ScheduleError(f"r={schedule_text(r)} is not possible for this model: it asks a layer for {max(schedule)} "
                            f"merges, and at most {cap} of its {dims.num_tokens - dims.num_protected} patch tokens merge "
                            f"in a layer (half): use at most {cap}")
    return schedule


def schedule_from_text(text: str) -> Schedule:
    """A schedule from the command line: ``"13"``, ``"16@-1"`` (r, inflect) or ``"8,8,4"`` / ``"[8,8,4]"`` (per
    layer, as a config writes it)."""
    t = text.strip()
    try:
        if "@" in t:
            base, inflect = t.split("@", 1)
            return (int(base), float(inflect))
        bracketed = t.startswith("[") and t.endswith("]")
        if bracketed or "," in t:
            return [int(v) for v in (t[1:-1] if bracketed else t).split(",") if v.strip()]
        return int(t)
    except ValueError:
        raise ScheduleError(
            f"r={text!r} is not allowed: use a non-negative integer (13), r@inflect (16@-1) or a per-layer list (8,8,4)"
        ) from None


def schedule_text(r: Schedule) -> str:
    """``r`` as a user writes it, in a config or after ``--r``, and :func:`schedule_from_text` reads back: ``13``,
    ``16@-1`` (not the tuple's repr ``(16, -1.0)``, which neither takes), ``[8, 8, 4]``."""
    if isinstance(r, tuple) and len(r) == 2:
        inflect = float(r[1])
        return f"{r[0]}@{int(inflect) if inflect.is_integer() else inflect!r}"
    if isinstance(r, AbcSequence) and not isinstance(r, (str, bytes)):
        return str(list(r))
    return str(r)
