"""Write a tiny randomly initialised ViT (no weights download) to a folder, for exercising the image path.

    python benchmarks/make_tiny_vit.py /tmp/tiny-vit   # then: dsom features FB15K-237 --image --image-model /tmp/tiny-vit

The features it produces are random projections of the pixels, not semantic image features: use them to test
the pipeline and to time it, never to judge a model.
"""

from __future__ import annotations

import argparse

import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    cfg = ViTConfig(image_size=args.image_size, patch_size=16, num_channels=3, hidden_size=args.hidden,
                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * args.hidden)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(args.folder)
    ViTImageProcessor(size={"height": args.image_size, "width": args.image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(args.folder)
    print(f"tiny ViT ({args.hidden}-d CLS) written to {args.folder}")


if __name__ == "__main__":
    main()
