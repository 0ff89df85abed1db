"""Token Merging for timm Vision Transformers: torch and timm only, no Lightning."""
from .merge import Merge, bipartite_soft_matching, max_merges, merge_wavg, unmerge_tokens
from .schedule import ScheduleError, ViTDims, parse_schedule, token_counts, vit_flops
from .timm_patch import (
    COMPILE_MODES, UnsupportedModelError, apply_tome, compile_tome, is_patched, remove_tome, set_r, tome_state,
)

__all__ = [
    "Merge", "bipartite_soft_matching", "max_merges", "merge_wavg", "unmerge_tokens",
    "ScheduleError", "ViTDims", "parse_schedule", "token_counts", "vit_flops",
    "COMPILE_MODES", "UnsupportedModelError", "apply_tome", "compile_tome", "is_patched", "remove_tome", "set_r",
    "tome_state",
]
