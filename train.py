"""Train a timm ViT with Token Merging: `python train.py --recipe mae_vitl_r8 [key=value ...]`."""
import sys

from tome_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
