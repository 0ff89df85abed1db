"""tome-train: train and ship timm Vision Transformers with Token Merging."""
from .tome import apply_tome, remove_tome, set_r

__all__ = ["apply_tome", "remove_tome", "set_r", "load_exported"]


def __getattr__(name):
    # load_exported lives with the export code; importing it lazily keeps `import tome_train` light.
    if name == "load_exported":
        from .export import load_exported

        return load_exported
    raise AttributeError(name)
