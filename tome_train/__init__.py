"""tome-train: train and ship timm Vision Transformers with Token Merging."""

__all__ = ["apply_tome", "remove_tome", "set_r", "load_exported"]


def __getattr__(name: str):
    # imported on first use: `import tome_train` (and the command line's checks of a config) stays free of torch
    if name in ("apply_tome", "remove_tome", "set_r"):
        from . import tome

        return getattr(tome, name)
    if name == "load_exported":
        from .export import load_exported

        return load_exported
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
