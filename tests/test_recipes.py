"""The ImageNet recipes hold the published hyperparameters, the code uses each as DeiT's and MAE's code do, and every
recipe dry-runs on CPU."""
import math
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
# REFERENCE.md section 2: (baseline top-1, baseline im/s, ToMe top-1, ToMe im/s); DeiT-B: DeiT's baseline alone
TABLE = {
    "deit_tiny": (71.8, 2558, 71.27, 3980),
    "deit_small": (79.8, 930, 79.36, 1550),
    "deit_base": (81.8, None, None, None),
    "mae_vitb": (83.62, 309, 81.91, 603),
    "mae_vitl": (85.66, 93, 85.09, 183),
    "mae_vith": (86.88, 35, 86.46, 63),
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
    # the paper's table (REFERENCE.md section 2): baseline top-1 @ im/s, ToMe top-1 @ im/s
    assert (cfg.reference.baseline_top1, cfg.reference.baseline_ims, cfg.reference.tome_top1,
            cfg.reference.tome_ims) == TABLE[family]
    # the trained r is the evaluated r; no dropout, nothing else changed in the timm model
    assert cfg.tome.r_eval is None and dict(cfg.model.timm_kwargs) == {} and cfg.model.checkpoint is None
    # no color jitter (DeiT's 0.4 is off under RandAugment, MAE passes none); RandomResizedCrop's default ratio
    assert d.color_jitter is None and tuple(d.ratio) == pytest.approx((3 / 4, 4 / 3))
    assert (d.train_samples, d.val_samples) == (1281167, 50000)


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
    schedule = ("warmup 5 epochs from 1e-06, cosine over the whole run to 1e-05" if family.startswith("deit")
                else "warmup 5 epochs from 0, then cosine to 1e-06")
    assert schedule in plan
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


# ---- the recipes' values as the code uses them: traced into the objects a run trains with ---------------------------
TOME_RECIPES = [name for name, _, r in RECIPES if r]
NARROW = "model.timm_kwargs={embed_dim: 64, num_heads: 2}"  # depth, patch size, pooling and head kept: fast on a CPU
STEPS_PER_EPOCH = 1281167 // 1024


def _fitted(recipe):
    """The recipe's module (its ViT narrowed) and the optimizer and scheduler Lightning gets from it on the recipe's
    published layout, one epoch being ImageNet's 1251 steps of 1024."""
    from types import SimpleNamespace

    from tome_train.module import ToMeClassifier

    cfg = load_config(recipe, [NARROW])
    module = ToMeClassifier(cfg)
    module._trainer = SimpleNamespace(
        world_size=cfg.layout.nodes * cfg.layout.gpus_per_node, accumulate_grad_batches=1, is_global_zero=True,
        estimated_stepping_batches=STEPS_PER_EPOCH * cfg.trainer.epochs, max_epochs=cfg.trainer.epochs,
        ckpt_path=None, strategy=SimpleNamespace(restore_checkpoint_after_setup=False))  # a fresh run
    out = module.configure_optimizers()
    assert out["lr_scheduler"]["interval"] == "step"
    return cfg, module, out["optimizer"], out["lr_scheduler"]["scheduler"]


def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's util/lr_decay.py get_layer_id_for_vit."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


@pytest.mark.parametrize("recipe", TOME_RECIPES)
def test_the_optimizer_and_lr_schedule_are_the_reference_codes(recipe, one_thread):
    """AdamW as DeiT's and MAE's code build it: no weight decay on 1-D parameters, pos_embed and cls_token; MAE's
    layer-wise lr decay (scale decay^(num_layers - layer_id), num_layers = depth + 1); the peak lr of the batch rule;
    MAE's per-iteration warmup from 0 and half-cycle cosine to min_lr, each group at its scale; DeiT's timm cosine
    over the whole run, the warmup from 1e-6 laid over its start (REFERENCE.md 3)."""
    cfg, module, optimizer, scheduler = _fitted(recipe)
    family = recipe.rsplit("_r", 1)[0]
    v = PUBLISHED[family][-1]
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)  # every weight trained
    num_layers = len(module.model.blocks) + 1
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        for p in group["params"]:
            name = names[id(p)]
            no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token", "dist_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            scale = 1.0 if v["layer_decay"] is None else v["layer_decay"] ** (num_layers - _mae_layer_id(name, num_layers))
            assert group.get("lr_scale", 1.0) == pytest.approx(scale), name

    total, warm = STEPS_PER_EPOCH * v["epochs"], STEPS_PER_EPOCH * v["warmup_epochs"]

    def lr_at(step):  # the lr of the schedule, each group's divided by its layer scale: one value
        scheduler.step_update(num_updates=step)
        lrs = {group["lr"] / group.get("lr_scale", 1.0) for group in optimizer.param_groups}
        assert max(lrs) == pytest.approx(min(lrs), rel=1e-9, abs=1e-15)
        return max(lrs)

    peak, start, floor = v["peak_lr"], v["warmup_lr"], v["min_lr"]
    assert lr_at(0) == pytest.approx(start, abs=1e-12)
    assert lr_at(warm // 2) == pytest.approx(start + (peak - start) * (warm // 2) / warm)  # linear, per iteration
    assert lr_at(total - 1) == pytest.approx(floor, rel=1e-3)
    if family.startswith("mae"):  # MAE's util/lr_sched.py adjust_learning_rate, at fractional epochs
        assert cfg.optim.warmup_prefix
        for step in (1, warm - 1, warm, warm + 1, (warm + total) // 2, total - STEPS_PER_EPOCH):
            epoch = step / STEPS_PER_EPOCH
            if epoch < v["warmup_epochs"]:
                expected = peak * epoch / v["warmup_epochs"]
            else:
                expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (epoch - v["warmup_epochs"])
                                                                         / (v["epochs"] - v["warmup_epochs"])))
            assert lr_at(step) == pytest.approx(expected), step
    else:  # DeiT's create_scheduler: timm's cosine with t_initial the run's length, per iteration here
        assert not cfg.optim.warmup_prefix
        assert lr_at(warm - 1) == pytest.approx(start + (peak - start) * (warm - 1) / warm)
        for step in (warm, warm + 1, total // 2, total - STEPS_PER_EPOCH):
            assert lr_at(step) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))


@pytest.mark.parametrize("recipe", TOME_RECIPES)
def test_the_model_loss_and_ema_are_the_reference_codes(recipe, one_thread):
    """timm's Mixup with the recipe's alphas, label smoothing and 1000 classes, and SoftTargetCrossEntropy on its
    soft targets; drop path linear over depth, no dropout; MAE: average pooling with fc_norm and the head drawn with
    std 2e-5, no EMA; DeiT: the class token, EMA 0.99996; ToMe at the recipe's r, trained and evaluated, proportional
    attention on."""
    from timm.data import Mixup
    from timm.layers import DropPath
    from timm.loss import SoftTargetCrossEntropy

    from tome_train.module import ToMeClassifier
    from tome_train.tome import tome_state

    family = recipe.rsplit("_r", 1)[0]
    _, r, *_, drop_path, pool, _ = PUBLISHED[family]
    cfg = load_config(recipe, [NARROW])
    module = ToMeClassifier(cfg)
    model, mix = module.model, module.mixup
    assert isinstance(mix, Mixup) and isinstance(module.train_loss, SoftTargetCrossEntropy)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.mode, mix.label_smoothing,
            mix.num_classes, mix.cutmix_minmax, mix.correct_lam) == (0.8, 1.0, 1.0, 0.5, "batch", 0.1, 1000, None, True)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, drop_path, len(model.blocks)).tolist())
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.0}
    assert model.global_pool == pool and model.num_classes == 1000
    if pool == "avg":
        assert isinstance(model.fc_norm, torch.nn.LayerNorm) and isinstance(model.norm, torch.nn.Identity)
        assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)
        assert not model.head.bias.any()  # trunc_normal_ cuts at +-2 absolute, as MAE's call of it: a plain normal
        assert module.ema is None
    else:
        assert isinstance(model.norm, torch.nn.LayerNorm) and isinstance(model.fc_norm, torch.nn.Identity)
        assert module.ema is not None and module.ema.decay == 0.99996
    assert schedule_of(module.train_r) == schedule_of(module.eval_r) == r
    assert tome_state(model).prop_attn is True


@pytest.mark.parametrize("recipe", ["deit_small_r13", "mae_vitl_r8"])
def test_the_augmentation_is_timms_reference_transform(recipe):
    """DeiT's and MAE's transforms (timm create_transform): RandomResizedCrop(224, 0.08-1, bicubic), flip,
    RandAugment m9 mstd0.5 on increasing ops, normalize, then random erasing on the normalized tensor; evaluation
    Resize(224 / 0.875 = 256, bicubic) + CenterCrop(224)."""
    from torchvision.transforms import InterpolationMode

    from tome_train.data.common import eval_transform, train_transform

    cfg = load_config(recipe)
    train = train_transform(cfg.data, cfg.model.img_size).transforms
    assert [type(t).__name__ for t in train] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip",
                                                 "RandAugment", "MaybeToTensor", "Normalize", "RandomErasing"]
    crop, flip, rand_aug, _, norm, erase = train
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC and flip.p == 0.5
    assert rand_aug.num_layers == 2 and rand_aug.choice_weights is None and len(rand_aug.ops) == 15
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 and op.prob == 0.5 for op in rand_aug.ops)
    assert {"PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing"} <= {op.name for op in rand_aug.ops}
    assert norm.mean.tolist() == pytest.approx([0.485, 0.456, 0.406]) and norm.std.tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert (erase.probability, erase.mode, erase.min_count, erase.max_count) == (0.25, "pixel", 1, 1)
    resize, center, _, norm = eval_transform(cfg.data, cfg.model.img_size).transforms
    assert (type(resize).__name__, resize.size, resize.interpolation) == ("Resize", 256, InterpolationMode.BICUBIC)
    assert center.size == (224, 224) and norm.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_the_ema_copy_needs_no_gradient(one_thread):
    """The EMA copy is updated by ema.update, never by the optimizer: a parameter that needs a gradient and gets none
    makes DDP raise 'parameters that were not used in producing the loss' at the second training step."""
    from tome_train.module import ToMeClassifier

    ema = ToMeClassifier(load_config("deit_tiny_r13", [NARROW])).ema
    assert ema is not None and not any(p.requires_grad for p in ema.parameters())
