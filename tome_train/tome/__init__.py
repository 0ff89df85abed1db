"""Token Merging for timm Vision Transformers: torch and timm only, no Lightning.

Each name is imported from its module on first use (PEP 562), so that the pure-Python schedules
(:mod:`.schedule`) and compile modes load without torch: a config can be checked, and a bad one refused, in a fraction
of a second.
"""
import importlib

_MODULE_OF = {
    **dict.fromkeys(("Merge", "bipartite_soft_matching", "merge_wavg", "unmerge_tokens"), "merge"),
    **dict.fromkeys(("ScheduleError", "ViTDims", "flop_bound", "max_merges", "parse_schedule", "token_counts",
                     "vit_flops"),
                    "schedule"),
    **dict.fromkeys(("COMPILE_MODES", "GRAPHED_COMPILE_MODES"), "compile_modes"),
    **dict.fromkeys(("UnsupportedModelError", "apply_tome", "compile_tome", "is_patched", "remove_tome", "set_r",
                     "tome_state"), "timm_patch"),
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
