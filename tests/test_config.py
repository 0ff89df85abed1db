"""Recipes: parsing, composition, overrides and the one-line errors of bad input."""
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tome_train.config import (DEFAULT_RECIPE, ConfigError, RunConfig, describe_recipes, list_recipes, load_config,
                                schedule_of, training_changes)

from conftest import ROOT, dotted_leaves


def test_every_recipe_resolves_without_missing_values():
    names = list_recipes()
    assert DEFAULT_RECIPE in names
    assert {"deit_tiny_r13", "deit_small_r13", "deit_base_r13", "mae_vitb_r16", "mae_vitl_r8", "mae_vith_r7"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name
        assert not OmegaConf.missing_keys(cfg)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_no_recipe_means_the_bundled_default():
    assert load_config(None).name == DEFAULT_RECIPE
    assert load_config(None).data.source == "digits"


def test_a_section_takes_a_mapping_of_its_keys():
    assert load_config(None, ["model={arch: vit_small_patch16_224, img_size: 64}"]).model.arch == "vit_small_patch16_224"


def test_overrides_are_typed_and_applied():
    cfg = load_config("mae_vitl_r8", ["optim.blr=2e-3", "trainer.epochs=3", "tome.r_train=[4,4,2]", "wandb.tags=[a,b]"])
    assert cfg.optim.blr == 2e-3 and isinstance(cfg.optim.blr, float)
    assert cfg.trainer.epochs == 3
    assert schedule_of(cfg.tome.r_train) == [4, 4, 2]
    assert list(cfg.wandb.tags) == ["a", "b"]
    assert load_config("mae_vitl_r8", ["trainer.compile=reduce-overhead"]).trainer.compile == "reduce-overhead"
    assert load_config("mae_vitl_r8", ["trainer.compile=true"]).trainer.compile is True
    # Lightning's meaning: an int counts batches, a float is a fraction of the epoch
    one_batch = load_config("mae_vitl_r8", ["trainer.limit_train_batches=1"]).trainer.limit_train_batches
    assert one_batch == 1 and isinstance(one_batch, int)
    assert load_config("mae_vitl_r8", ["trainer.limit_train_batches=0.25"]).trainer.limit_train_batches == 0.25
    inflect = load_config("mae_vitl_r8", ["tome.r_train={r: 8, inflect: -1}"])
    assert schedule_of(inflect.tome.r_train) == (8, -1.0)
    # the text forms of bench --r and export --r
    assert schedule_of(load_config("mae_vitl_r8", ["tome.r_train=8@-1"]).tome.r_train) == (8, -1.0)
    assert schedule_of(load_config("mae_vitl_r8", ["tome.r_eval=8,8,4"]).tome.r_eval) == [8, 8, 4]


def test_a_text_field_keeps_the_text_as_written(tmp_path):
    """YAML 1.1 reads yes, no, on and off as booleans and 012 as 10, 0x10 as 16, 1e3 as 1000.0: a field the schema
    types as text took 'True', '10', '1000.0' (wandb.name=yes was the run 'True')."""
    cfg = load_config(None, ["wandb.name=yes", "wandb.tags=[yes,no,'on',012,1e3]", "wandb.id=0123", "wandb.entity=0x10",
                             "model.arch=on", "trainer.precision=32", "data.root=1_000"])
    assert (cfg.wandb.name, cfg.wandb.id, cfg.wandb.entity) == ("yes", "0123", "0x10")
    assert list(cfg.wandb.tags) == ["yes", "no", "on", "012", "1e3"]
    assert (cfg.model.arch, cfg.trainer.precision, cfg.data.root) == ("on", "32", "1_000")
    assert load_config(None, ["wandb={name: off, mode: offline}"]).wandb.name == "off"  # a section's keys too
    assert load_config(None, ["wandb.name=null"]).wandb.name is None  # null is no text
    assert load_config(None, ["wandb.name='yes'"]).wandb.name == "yes"  # quoted: as before
    # what the schema does not type as text is YAML's: a bool, a number, a schedule
    cfg = load_config(None, ["tome.prop_attn=no", "trainer.compile=yes", "tome.r_train=0x4", "optim.blr=1e-3"])
    assert cfg.tome.prop_attn is False and cfg.trainer.compile is True and cfg.tome.r_train == 4
    assert cfg.optim.blr == 1e-3
    recipe = tmp_path / "mine.yaml"  # a recipe's file, as an override
    recipe.write_text("defaults: [model/digits_vit, data/digits, optim/digits, trainer/cpu]\n"
                      "tome: {r_train: 2, prop_attn: on}\nwandb: {name: off, tags: [yes, 1e3], mode: ~}\n")
    cfg = load_config(str(recipe))
    assert cfg.wandb.name == "off" and list(cfg.wandb.tags) == ["yes", "1e3"] and cfg.wandb.mode is None
    assert cfg.tome.prop_attn is True


def test_a_recipe_path_that_is_a_directory_is_not_a_file(tmp_path):
    (tmp_path / "recipe.yaml").mkdir()
    with pytest.raises(ConfigError, match=f"^recipe file {re.escape(str(tmp_path / 'recipe.yaml'))}: not a file$"):
        load_config(str(tmp_path / "recipe.yaml"))


def test_no_recipe_or_fragment_restates_a_schema_default():
    """A default of the schema (a feature off, or how a feature works once switched on) is set in one place, the
    schema: tome.r_eval: null was in every recipe, re_mode: pixel and the mixup settings in fragments."""
    defaults = {k: v for k, v in dotted_leaves(OmegaConf.to_container(OmegaConf.structured(RunConfig))).items() if v != "???"}
    restated = []
    for path in sorted([*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "recipes").glob("*.yaml")]):
        for key, value in dotted_leaves(OmegaConf.to_container(OmegaConf.load(path))).items():
            if key.startswith("layout."):  # a published layout names both its numbers: 1 node x 4 GPUs
                continue
            if key in defaults and value == defaults[key] and isinstance(value, bool) == isinstance(defaults[key], bool):
                restated.append(f"{path.relative_to(ROOT)}: {key}={value!r}")
    assert restated == []


def test_recipe_path_and_fragment_order(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults: [model/mae_vitb, data/imagenet_wds, optim/mae_vitb, trainer/gpu]\n"
                      "tome: {r_train: 3, prop_attn: false}\noptim: {blr: 1.0e-4}\n")
    cfg = load_config(str(recipe))
    assert cfg.name == "mine"
    assert cfg.optim.blr == 1e-4  # the recipe wins over its fragments
    assert cfg.optim.layer_decay == 0.65  # from optim/mae_vitb
    assert cfg.optim.min_lr == 1e-6  # from optim/mae_finetune, which optim/mae_vitb extends
    recipe.write_text("defaults: [model/mae_vitb]\ntrainer: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(recipe))}: unknown key 'trainer.epochz'"):
        load_config(str(recipe))  # the file's own path, not recipes/mine.yaml


@pytest.mark.parametrize(
    "recipe, overrides, needle",
    [
        ("mae_vit_r8", [], "unknown recipe 'mae_vit_r8' (did you mean 'mae_vitl_r8'?)"),
        ("mae_vitl_r8", ["optim.bllr=1"], "unknown key 'optim.bllr' (did you mean 'optim.blr'?)"),
        ("MAE_VITL_R8", [], "unknown recipe 'MAE_VITL_R8' (did you mean 'mae_vitl_r8'?)"),
        ("mae_vitl_r8", ["Trainer.Epochs=3"], "unknown key 'Trainer' (did you mean 'trainer'?)"),
        ("mae_vitl_r8", ["model=vit"], "override 'model=vit': model is a section, not a value; set its keys "
                                       "(model.arch, model.img_size, "),
        ("mae_vitl_r8", ["model={arch:vit}"], "unknown key 'model.arch:vit' (YAML reads {a:1} as the one key 'a:1': "
                                              "write {a: 1}, a space after the colon)"),
        ("mae_vitl_r8", ["optim.blr=fast"], "bad value 'fast' for 'optim.blr'"),
        ("mae_vitl_r8", ["trainer.epochs=1.5"], "bad value 1.5 for 'trainer.epochs'"),
        ("mae_vitl_r8", ["tome.r_train=-2"], "tome.r_train: r=-2 is not allowed"),
        ("mae_vitl_r8", ["tome.r_train=2.5"], "r=2.5 is not allowed"),
        ("mae_vitl_r8", ["data.source=lmdb"], "data.source='lmdb' is not allowed: use one of digits, imagefolder, webdataset"),
        ("mae_vitl_r8", ["epochs"], "override 'epochs' is not key=value"),
        ("mae_vitl_r8", ["trainer.devices=many"], "trainer.devices='many' is not allowed: use a positive integer or auto"),
        ("mae_vitl_r8", ["trainer.compile=fast"], "trainer.compile='fast' is not allowed: use one of False, True, default, "
                                                  "reduce-overhead"),
        ("mae_vitl_r8", ["trainer.compile=1"], "trainer.compile=1 is not allowed: use one of False, True, default"),
        ("digits_vit_r6", ["wandb.mode=offlien"], "wandb.mode='offlien' is not allowed: use one of null, online, "
                                                   "offline, disabled"),
        ("digits_vit_r6", ["data.interpolation=cubic"], "data.interpolation='cubic' is not allowed: use one of nearest, "
                                                        "bilinear, bicubic"),
        ("digits_vit_r6", ["mixup.mode=pair2"], "mixup.mode='pair2' is not allowed: use one of batch, pair, elem"),
        ("digits_vit_r6", ["data.re_mode=foo"], "data.re_mode='foo' is not allowed: use one of const, rand, pixel"),
        ("digits_vit_r6", ["trainer.epochs=0"], "trainer.epochs=0 is not allowed: use a positive integer"),
        ("digits_vit_r6", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is not allowed"),
        ("digits_vit_r6", ["trainer.num_nodes=0"], "trainer.num_nodes=0 is not allowed: use a positive integer"),
        ("digits_vit_r6", ["data.val_fraction=1.5"], "data.val_fraction=1.5 is not allowed: use a number in (0, 1)"),
        ("digits_vit_r6", ["data.repeated_aug=0"], "data.repeated_aug=0 is not allowed: use a positive integer"),
        ("digits_vit_r6", ["data.hflip=2"], "data.hflip=2.0 is not allowed: use a number in [0, 1]"),
        ("digits_vit_r6", ["optim.ema_decay=1"], "optim.ema_decay=1.0 is not allowed: use a number in (0, 1)"),
        ("digits_vit_r6", ["tradeoff.batch_size=0"], "tradeoff.batch_size=0 is not allowed: use a positive integer"),
        ("digits_vit_r6", ["data.scale=[0.5]"], "data.scale=[0.5] is not allowed: use two numbers 0 < min <= max <= 1"),
        ("digits_vit_r6", ["data.scale=[0.9,0.5]"], "data.scale=[0.9, 0.5] is not allowed"),
        ("digits_vit_r6", ["optim.betas=[0.9]"], "optim.betas=[0.9] is not allowed: use two numbers in [0, 1)"),
        ("digits_vit_r6", ["data.mean=[0.5]"], "data.mean=[0.5] is not allowed: use three finite numbers, one per RGB "
                                               "channel"),
        ("digits_vit_r6", ["data.std=[0.5,0,0.5]"], "data.std=[0.5, 0.0, 0.5] is not allowed: use three finite numbers > 0"),
        # infinity (YAML's inf, .inf, or a float past the largest) passed every range check; nan was refused
        ("digits_vit_r6", ["optim.blr=inf"], "optim.blr=inf is not allowed: use a finite number > 0"),
        ("digits_vit_r6", ["optim.blr=1e999"], "optim.blr=inf is not allowed: use a finite number > 0"),
        ("digits_vit_r6", ["optim.blr=nan"], "optim.blr=nan is not allowed: use a finite number > 0"),
        ("digits_vit_r6", ["optim.weight_decay=.inf"], "optim.weight_decay=inf is not allowed: use a finite number >= 0"),
        ("digits_vit_r6", ["mixup.mixup_alpha=inf"], "mixup.mixup_alpha=inf is not allowed: use a finite number >= 0"),
        ("digits_vit_r6", ["optim.clip_grad=inf"], "optim.clip_grad=inf is not allowed: use a finite number > 0"),
        ("digits_vit_r6", ["data.ratio=[0.5,inf]"], "data.ratio=[0.5, inf] is not allowed: use two finite numbers"),
        ("digits_vit_r6", ["data.mean=[.nan,0,0]"], "data.mean=[nan, 0.0, 0.0] is not allowed: use three finite"),
        ("digits_vit_r6", ["data.std=[inf,1,1]"], "data.std=[inf, 1.0, 1.0] is not allowed: use three finite numbers > 0"),
        # text as written, not as YAML 1.1 reads it (off: False, yes: True), in what is refused too
        ("digits_vit_r6", ["wandb.mode=off"], "wandb.mode='off' is not allowed: use one of null, online, offline, "
                                              "disabled"),
        ("digits_vit_r6", ["wandb={mode: on}"], "wandb.mode='on' is not allowed"),
        ("digits_vit_r6", ["wandb.mode=OFFLINE"], "wandb.mode='OFFLINE' is not allowed: use one of null, online, offline, "
                                                  "disabled (did you mean 'offline'? the choices are lower case)"),
        ("digits_vit_r6", ["trainer.precision=BF16-mixed"], "(did you mean 'bf16-mixed'?"),
        ("digits_vit_r6", ["trainer.epochs=yes"], "override 'trainer.epochs=yes': bad value 'yes' (YAML reads it as True) "
                                                  "for 'trainer.epochs'"),
        ("digits_vit_r6", ["tradeoff.r_values=[1,no]"], "bad value 'no' (YAML reads it as False) for 'tradeoff.r_values[1]'"),
        ("digits_vit_r6", ["trainer={epochs: "], "override 'trainer={epochs: ': the value is not YAML (did not find "
                                                 "expected node content)"),  # it was yaml's traceback
        # a path is a file's, and said so; an empty name is no recipe (it was the default recipe)
        ("/no/such/recipe.yaml", [], "recipe file /no/such/recipe.yaml: no such file"),
        ("recipes/mae_vitl_r8", [], "recipe file recipes/mae_vitl_r8: no such file (did you mean 'mae_vitl_r8'?)"),
        ("mine.yml", [], "recipe file mine.yml: no such file"),
        ("", [], "recipe '' is empty: use a recipe name (deit_base_r0, "),
        (" ", [], "recipe ' ' is empty"),
        ("mae_vitl_r8", ["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5 is not allowed: use a "
                                                             "number of batches (an integer >= 1), a fraction"),
        ("mae_vitl_r8", ["trainer.limit_val_batches=-1"], "trainer.limit_val_batches=-1 is not allowed"),
        # no validation: no best checkpoint, no top-1 (the run ended in a traceback after training)
        ("digits_vit_r6", ["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0 is not allowed"),
        ("digits_vit_r6", ["trainer.limit_val_batches=0.0"], "trainer.limit_val_batches=0.0 is not allowed"),
        ("digits_vit_r6", ["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 is not allowed"),
        # the trade-off sweep after training: said before it, not after (each was a traceback or a late exit 2)
        ("digits_vit_r6", ["tradeoff.r_values=[]"], "tradeoff.r_values=[] is not allowed: use a list of one or more "
                                                    "integers >= 0, or null"),
        ("digits_vit_r6", ["tradeoff.r_values=[-1,2]"], "tradeoff.r_values=[-1, 2] is not allowed"),
        ("digits_vit_r6", ["tradeoff.num_vis_images=0"], "tradeoff.num_vis_images=0 is not allowed: use a positive"),
        # YAML reads {r:6,inflect:-1} as the keys 'r:6' and 'inflect:-1' (was OmegaConf's three-line missing-key error)
        ("digits_vit_r6", ["tome.r_train={r:6,inflect:-1}"], "tome.r_train: r={'r:6': None, 'inflect:-1': None} is not "
                                                             "allowed: use {r: 16, inflect: -1} (a space after each "
                                                             "colon), 16@-1, an integer (13) or a per-layer list"),
        ("digits_vit_r6", ["tome.r_eval={r: 6}"], "tome.r_eval: r={'r': 6} is not allowed"),
        ("digits_vit_r6", ["tome.r_train=6@x"], "tome.r_train: r='6@x' is not allowed: use a non-negative integer"),
        ("mae_vitl_r8", ["trainer.limit_val_batches=some"], "trainer.limit_val_batches='some' is not allowed"),
        ("mae_vitl_r8", ["data.batch_size=63"], "data.batch_size=63 is not allowed with mixup or cutmix (timm's Mixup "
                                                "mixes each image with another of its batch): use an even batch size"),
        ("digits_vit_r6", ["data.batch_size=63", "mixup.cutmix_alpha=1.0"], "data.batch_size=63 is not allowed"),
    ],
)
def test_bad_input_is_one_clear_error(recipe, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_interpolation_choices_are_timms():
    from timm.data.transforms import _str_to_torch_interpolation

    from tome_train.config import _CHOICES

    assert set(_CHOICES["data.interpolation"]) == set(_str_to_torch_interpolation)


def test_unknown_fragment_is_named(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("defaults: [model/deit_smal]\n")
    with pytest.raises(ConfigError, match="unknown config fragment 'model/deit_smal' \\(did you mean 'model/deit_small'\\?\\)"):
        load_config(str(recipe))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True)


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    for args in (["--recipe", "nope"], ["trainer.epoch=3"], ["tome.r_train=-1"],
                 ["--recipe", "mae_vitl_r8", "--dry-run", "data.root=/does/not/exist"],
                 ["--slurm", "--dry-run", "--cpus-per-task", "0"], ["--slurm", "--dry-run", "--time", "forever"]):
        result = _cli(*args, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, error", [
    ("model.img_size=30", "model.img_size=30 is not allowed for vit_tiny_patch16_224 with 4x4 patches: use a multiple of "
                          "the patch size"),
    ("trainer.accelerator=tpuu", "trainer.accelerator=tpuu, devices=1, precision=32-true: You selected an invalid "
                                 "accelerator name: `accelerator='tpuu'`. Available names are:"),
    # more merges than any layer of the model can make: the core would cap them silently
    ("tome.r_train=33", "tome.r_train: r=33 is not possible for this model: it asks a layer for 33 merges, and at most "
                        "32 of its 64 patch tokens merge in a layer (half): use at most 32\n"),
    ("tome.r_eval={r: 20, inflect: -1}", "tome.r_eval: r=20@-1 is not possible for this model: it asks a layer for "
                                         "40 merges"),
    ("tradeoff.r_values=[0,8,64]", "tradeoff.r_values: r=64 is not possible for this model"),
    ("tome.r_train=[1,2,3,4,5,6,7]", "tome.r_train: r schedule of length 7 is not allowed: the model has 6 blocks\n"),
])
def test_what_the_imports_refuse_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, override, error):
    """What only the built model or Lightning's Trainer shows is refused before the run directory is made."""
    from tome_train.cli import main

    assert main(["--output-dir", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, error", [
    (["--recipe", "digits_vit_r6", "tome.r_train=-1", "trainer.compile=false"],
     "tome.r_train: r=-1 is not allowed: use a non-negative integer"),
    (["--recipe", "deit_small_r13"], "data.root is required for data.source=webdataset: the shards' folder "
                                      "(data.root=DIR, or IMAGENET_WDS=DIR in the environment for the ImageNet recipes)"),
    (["--recipe", "deit_small_r13", "trainer.limit_val_batches=0.5"],
     "trainer.limit_val_batches=0.5 is not allowed with data.source=webdataset (shards have no index, so the validation "
     "stream has no length to take a fraction of): use a number of batches (an integer >= 1), 1.0 or null"),
    (["--recipe", "mae_vitl_r8", "--dry-run", "data.root=/does/not/exist"],
     "webdataset root /does/not/exist is not a directory"),
    (["--recipe", "deit_small_r13", "data.source=imagefolder", "data.root=."],
     "imagefolder train directory ./train does not exist"),
    (["model.checkpoint=missing.pth"], "model.checkpoint=missing.pth: no such file"),
    (["--recipe", "deit_small_r13", "data.root=.", "data.train_shards=imagenet1k-train-{0000..0004.tar"],
     "shard pattern 'imagenet1k-train-{0000..0004.tar' has unbalanced braces: write a range as "
     "imagenet1k-train-{0000..1023}.tar"),
    (["data.val_fraction=null"], "data.val_fraction is required for data.source=digits: the held-out share, in (0, 1)"),
    (["--resume", "missing.ckpt"], "--resume missing.ckpt: no such checkpoint file"),
    (["export", "--checkpoint", "missing.ckpt", "--out", "out"], "--checkpoint missing.ckpt: no such file"),
    (["export", "--checkpoint", "missing.ckpt", "--out", "out", "--r", "8;8"],
     "r='8;8' is not allowed: use a non-negative integer (13), r@inflect (16@-1) or a per-layer list (8,8,4)"),
    (["--dry-run", "optim.blr=inf"], "optim.blr=inf is not allowed: use a finite number > 0"),
    (["trainer.compile=nope"], "trainer.compile='nope' is not allowed: use one of False, True, default, reduce-overhead, "
                               "max-autotune, max-autotune-no-cudagraphs"),
    (["--dry-run", "model.timm_kwargs={depth:3}"],  # timm was given no depth: the model had its default
     "model.timm_kwargs: unknown key 'depth:3' (YAML reads {a:1} as the one key 'a:1': write {a: 1}, a space after "
     "the colon)"),
    (["model.timm_kwargs.depth=null"], "model.timm_kwargs.depth=null is not allowed: timm leaves a null argument out; "
                                       "give a value, or remove the key for the model's default"),
    (["model.checkpoint=/tmp"], "model.checkpoint=/tmp: is a folder; pass a weights file (an export's "
                                "/tmp/model.safetensors)"),
    (["--print-config", "wandb.mode=off"], "wandb.mode='off' is not allowed: use one of null, online, offline, disabled"),
    (["--recipe", "/tmp/no-such-recipe.yaml", "--print-config"], "recipe file /tmp/no-such-recipe.yaml: no such file"),
    (["--recipe", "", "--dry-run"], "recipe '' is empty: use a recipe name (deit_base_r0, deit_base_r13, deit_small_r0, "
                                    "deit_small_r13, deit_tiny_r0, deit_tiny_r13, digits_vit_r6, mae_vitb_r0, mae_vitb_r16, "
                                    "mae_vith_r0, mae_vith_r7, mae_vitl_r0, mae_vitl_r8) or the path of a YAML file"),
])
def test_bad_config_or_missing_path_is_refused_before_torch_is_imported(tmp_path, args, error):
    """A typo or a missing data or checkpoint path costs a fraction of a second, not the seconds torch, timm and
    Lightning take to import."""
    script = f"import sys; from tome_train.cli import main; rc = main({args!r}); print(rc, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr == f"error: {error}\n"
    assert list(tmp_path.iterdir()) == []


def test_an_online_wandb_run_without_an_api_key_is_refused_before_torch_is_imported(tmp_path, monkeypatch):
    """wandb raised its UsageError once Lightning started the run, a traceback after the run directory was made."""
    from tome_train.cli import _wandb_key_configured

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    script = ("import sys; from tome_train.cli import main; rc = main(['wandb.mode=online']); "
              "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr == ("error: wandb.mode=online needs an API key: set WANDB_API_KEY or run `wandb login`, or "
                             "use wandb.mode=offline (`wandb sync` uploads the run later)\n")
    assert list(tmp_path.iterdir()) == []
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not _wandb_key_configured()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert _wandb_key_configured()  # what `wandb login` writes
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not _wandb_key_configured()  # a server of one's own has an entry of its own


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_wandb_mode_of_the_environment_wandb_has_not_is_refused_before_torch_is_imported(tmp_path, dry_run):
    """wandb's settings refused it with a traceback once the run directory and its wandb id were written."""
    env = {**os.environ, "WANDB_MODE": "offlne"}
    script = f"import sys; from tome_train.cli import main; rc = main({dry_run!r}); print(rc, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr == "error: WANDB_MODE='offlne' is not allowed: use one of online, offline, disabled\n"
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_that_is_a_file_is_one_line_exit_2(tmp_path):
    """It was mkdir's FileExistsError (or NotADirectoryError) traceback, exit 1, once the run was set up."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for out, where in ((file, "is a file"), (file / "run", f"is under the file {file}")):
        for mode in (["--dry-run"], ["--slurm", "--dry-run"], []):
            result = _cli("--output-dir", str(out), *mode, cwd=tmp_path)
            assert result.returncode == 2, (mode, result.stderr)
            assert result.stderr == f"error: output_dir={out} {where}: pass a directory (a new one, or a run's)\n"
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_every_recipe_describes_itself_in_a_line():
    """Only the digits recipe had a ``description`` (which nothing read); the others said it in a comment."""
    lines = describe_recipes()
    assert [line.split()[0] for line in lines] == list_recipes()
    for name, line in zip(list_recipes(), lines):
        description = load_config(name).description
        assert description and "\n" not in description and line.endswith(f"  {description}"), name


def test_cli_lists_and_prints_config(tmp_path):
    listed = _cli("--list-recipes", cwd=tmp_path)
    assert listed.returncode == 0 and [line.split()[0] for line in listed.stdout.splitlines()] == list_recipes()
    assert listed.stdout.splitlines() == describe_recipes()  # each with its description
    printed = _cli("--recipe", "deit_small_r13", "--print-config", "trainer.epochs=7", cwd=tmp_path)
    assert printed.returncode == 0
    cfg = OmegaConf.create(printed.stdout)
    assert cfg.trainer.epochs == 7 and cfg.tome.r_train == 13 and cfg.optim.blr == 5e-4
    # overrides before, between and after the options (argparse alone took only the first run of them)
    printed = _cli("seed=3", "--recipe", "deit_small_r13", "trainer.epochs=7", "--output-dir", "elsewhere",
                   "--print-config", "tome.r_train=4", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    cfg = OmegaConf.create(printed.stdout)
    assert (cfg.seed, cfg.trainer.epochs, cfg.tome.r_train, cfg.output_dir) == (3, 7, 4, "elsewhere")
    assert list(tmp_path.iterdir()) == []


def test_training_changes_name_what_is_trained_otherwise_and_pass_over_where_and_how_it_runs():
    saved = OmegaConf.to_container(load_config(None, []), resolve=True)
    same_training = load_config(None, ["trainer.epochs=3", "data.num_workers=2", "tome.r_eval=2", "wandb.tags=[a]",
                                       "tradeoff.r_values=[0,4]", "output_dir=elsewhere"])
    assert training_changes(saved, same_training) == []
    other = load_config(None, ["tome.r_train=8", "optim.betas=[0.9,0.95]", "seed=1", "trainer.epochs=3"])
    assert training_changes(saved, other) == [
        "optim.betas: [0.9, 0.999] -> [0.9, 0.95]", "seed: 0 -> 1", "tome.r_train: 6 -> 8"]
    assert training_changes(saved, load_config(None, ["tome.r_train={r: 6, inflect: -1}"])) == [
        "tome.r_train: 6 -> {'r': 6, 'inflect': -1}"]  # a value against a section: the whole value
    del saved["tome"]["r_train"]  # a key one version of the schema has and the other not: nothing to compare
    assert training_changes(saved, other) == ["optim.betas: [0.9, 0.999] -> [0.9, 0.95]", "seed: 0 -> 1"]


def test_an_odd_batch_is_allowed_without_mixup():
    assert load_config("digits_vit_r6", ["data.batch_size=63"]).data.batch_size == 63
