"""The ImageNet recipes hold the published hyperparameters, and every one dry-runs on CPU."""
import subprocess
import sys

import pytest
import timm
import torch
from omegaconf import OmegaConf

from tome_train.cli import dry_run, main
from tome_train.config import _fragments, _read_recipe, load_config, schedule_of

from conftest import ROOT, dotted_leaves

DEIT = dict(epochs=300, peak_lr=1e-3, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05,
            layer_decay=None, ema=0.99996, repeated_aug=3, lr_base_batch=512)
MAE = dict(warmup_epochs=5, warmup_lr=0.0, min_lr=1e-6, weight_decay=0.05, ema=None, repeated_aug=1, lr_base_batch=256)
# recipe: (arch, r, nodes, gpus per node, batch per gpu, drop path, pool, family-specific values)
PUBLISHED = {
    "deit_tiny": ("deit_tiny_patch16_224", 13, 1, 4, 256, 0.1, "token", DEIT),
    "deit_small": ("deit_small_patch16_224", 13, 1, 4, 256, 0.1, "token", DEIT),
    "deit_base": ("deit_base_patch16_224", 13, 2, 8, 64, 0.1, "token", DEIT),
    "mae_vitb": ("vit_base_patch16_224", 16, 4, 8, 32, 0.1, "avg", dict(MAE, epochs=100, peak_lr=2e-3, layer_decay=0.65)),
    "mae_vitl": ("vit_large_patch16_224", 8, 4, 8, 32, 0.2, "avg", dict(MAE, epochs=50, peak_lr=4e-3, layer_decay=0.75)),
    "mae_vith": ("vit_huge_patch14_224", 7, 8, 8, 16, 0.3, "avg", dict(MAE, epochs=50, peak_lr=4e-3, layer_decay=0.75)),
}
RECIPES = [(f"{family}_r{r}", family, r) for family, spec in PUBLISHED.items() for r in (spec[1], 0)]


@pytest.mark.parametrize("recipe, family, r", RECIPES)
def test_recipe_holds_the_published_values(recipe, family, r):
    arch, _, nodes, gpus, batch, drop_path, pool, v = PUBLISHED[family]
    cfg = load_config(recipe)
    assert cfg.model.arch == arch and cfg.model.img_size == 224 and cfg.model.num_classes == 1000
    assert cfg.model.drop_path_rate == drop_path and cfg.model.global_pool == pool
    assert cfg.model.head_init_std == (2e-5 if family.startswith("mae") else None)
    assert schedule_of(cfg.tome.r_train) == r and cfg.tome.prop_attn is True
    # resolved for the published layout
    assert (cfg.layout.nodes, cfg.layout.gpus_per_node, cfg.data.batch_size) == (nodes, gpus, batch)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (nodes, gpus)
    global_batch = nodes * gpus * batch * cfg.trainer.accumulate_grad_batches
    assert global_batch == 1024
    assert cfg.optim.blr * global_batch / cfg.optim.lr_base_batch == pytest.approx(v["peak_lr"])
    assert cfg.optim.lr_base_batch == v["lr_base_batch"]
    assert cfg.trainer.epochs == v["epochs"]
    assert cfg.optim.warmup_epochs == v["warmup_epochs"] and cfg.optim.warmup_lr == v["warmup_lr"]
    assert cfg.optim.min_lr == v["min_lr"] and cfg.optim.weight_decay == v["weight_decay"]
    assert cfg.optim.layer_decay == v["layer_decay"] and cfg.optim.ema_decay == v["ema"]
    assert tuple(cfg.optim.betas) == (0.9, 0.999) and cfg.optim.eps == 1e-8 and cfg.optim.clip_grad is None
    assert cfg.data.repeated_aug == v["repeated_aug"]
    # augmentation, identical for both families
    d, m = cfg.data, cfg.mixup
    assert d.auto_augment == "rand-m9-mstd0.5-inc1" and d.interpolation == "bicubic"
    assert (d.re_prob, d.re_mode, d.re_count) == (0.25, "pixel", 1)
    assert tuple(d.scale) == (0.08, 1.0) and d.hflip == 0.5 and d.crop_pct == 0.875
    assert tuple(d.mean) == (0.485, 0.456, 0.406) and tuple(d.std) == (0.229, 0.224, 0.225)
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.mode, m.label_smoothing) == (0.8, 1.0, 1.0, 0.5, "batch", 0.1)
    assert cfg.trainer.precision == "16-mixed"
    assert cfg.reference.baseline_top1 is not None


# Set in more than one file on purpose: each recipe's own ToMe settings; DeiT's and MAE's own schedules, which agree
# on the warmup; each model's published layout (MAE's on 8-GPU nodes).
SET_PER_RECIPE = {"tome.prop_attn", "optim.warmup_epochs", "layout.gpus_per_node"}


@pytest.mark.parametrize("family", ["deit", "mae", ""])
def test_a_value_the_recipes_share_is_set_in_one_file(family):
    """The AdamW settings were in three optim fragments, the mixup line in two, image size, classes and the paper's
    table in six model fragments: a value every recipe of a family (or every ImageNet recipe) takes is set once."""
    recipes = [name for name, _, _ in RECIPES if name.startswith(family)]
    resolved = [dotted_leaves(OmegaConf.to_container(load_config(name), resolve=True)) for name in recipes]
    shared = {k for k, v in resolved[0].items() if all(other.get(k) == v for other in resolved)} - SET_PER_RECIPE
    files = {}
    for name in recipes:
        _, origin, recipe, _ = _read_recipe(name)
        for path, layer, _ in [*_fragments(recipe, name), (origin, recipe, None)]:
            for key in dotted_leaves(OmegaConf.to_container(layer)).keys() & shared:
                files.setdefault(key, set()).add(path)
    assert {key: sorted(paths) for key, paths in files.items() if len(paths) > 1} == {}
    assert files["model.num_classes"] == files["model.img_size"] == {"configs/data/imagenet_wds.yaml"}


def test_the_data_benchmark_times_the_recipes_augmentation():
    """tome_train.data.bench read its augmentation and image size from the fragments' own keys, which a fragment
    need not set (the schema's defaults, or another fragment's): it takes what the DeiT-S recipe resolves to."""
    from tome_train.data.bench import deit_augmentation

    aug, img_size = deit_augmentation()
    cfg = OmegaConf.to_container(load_config("deit_small_r13"), resolve=True)
    assert img_size == cfg["model"]["img_size"] == 224
    assert len(aug) == 12 and aug == {key: cfg["data"][key] for key in aug}


@pytest.mark.parametrize("recipe", [name for name, _, _ in RECIPES])
def test_every_recipe_dry_runs_on_cpu(recipe, imagenet_layout):
    cfg = load_config(recipe, [f"data.root={imagenet_layout}"])
    plan = dry_run(cfg)
    family = recipe.rsplit("_r", 1)[0]
    _, r, nodes, gpus, batch, *_ = PUBLISHED[family]
    assert f"global batch 1024 = {batch} per device x {nodes * gpus}" in plan
    assert "'shards': 1024" in plan and "'shards': 64" in plan and "'samples': 1281167" in plan
    steps = 1281167 // 1024
    assert f"steps: {steps} per epoch" in plan
    assert "checkpoint: none" in plan
    if recipe.endswith("_r0"):
        assert "1.00x bound" in plan
    else:
        assert f"merges per layer [{r}, {r}," in plan


def test_dry_run_names_the_checkpoint_and_fails_cleanly(imagenet_layout, tmp_path, capsys):
    tiny = ["model.timm_kwargs={embed_dim: 64, depth: 2, num_heads: 2}", f"data.root={imagenet_layout}"]
    source = timm.create_model("vit_base_patch16_224", embed_dim=64, depth=2, num_heads=2, num_classes=0)
    mae = {"model": {**source.state_dict(), "decoder_embed.weight": torch.zeros(8, 64), "mask_token": torch.zeros(1, 1, 64)}}
    torch.save(mae, tmp_path / "mae_pretrain.pth")
    plan = dry_run(load_config("mae_vitb_r16", [*tiny, f"model.checkpoint={tmp_path / 'mae_pretrain.pth'}"]))
    assert f"checkpoint {tmp_path / 'mae_pretrain.pth'}" in plan and "decoder" in plan

    dry = ["--recipe", "mae_vitb_r16", "--dry-run"]
    # the first from a process of its own (its exit code and all it prints), the others through the same entry point
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *dry, *tiny,
                             f"model.checkpoint={tmp_path / 'missing.pth'}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith("error: ") and "missing.pth" in result.stderr and result.stderr.count("\n") == 1
    for args, needle in [
        (["model.timm_kwargs={embed_dim: 96, depth: 2, num_heads: 2}", f"data.root={imagenet_layout}",
          f"model.checkpoint={tmp_path / 'mae_pretrain.pth'}"], "shape"),
        ([f"data.root={tmp_path / 'no-shards'}"], "no-shards"),
    ]:
        assert main([*dry, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_dry_run_shows_the_merges_an_r_too_large_gets(tmp_path):
    # the digits ViT: 65 tokens, the class token protected, 6 blocks; each merges at most half its 64, 32, ... patches
    plan = dry_run(load_config("digits_vit_r6", ["tome.r_train=32", f"output_dir={tmp_path}"]))
    assert ("r_train 32: merges per layer [32, 16, 8, 4, 2, 1] (asked [32, 32, 32, 32, 32, 32]: at most half of a "
            "layer's unprotected tokens merge") in plan
    assert "tokens [65, 33, 17, 9, 5, 3, 2]" in plan
    assert "r_eval 32: merges per layer [32, 16," in plan
    default = dry_run(load_config("digits_vit_r6", [f"output_dir={tmp_path}"]))
    assert "r_train 6: merges per layer [6, 6, 6, 6, 6, 6]; tokens [65, 59, 53, 47, 41, 35, 29]" in default
