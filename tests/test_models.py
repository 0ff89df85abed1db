"""build_model / load_pretrained: MAE, timm state dict and safetensors checkpoints, made here."""
from __future__ import annotations

import argparse

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from tome_train.config import ConfigError
from tome_train.models import (
    ALLOWED_MISSING,
    CheckpointError,
    build_model,
    checkpoint_summary,
    load_pretrained,
    read_checkpoint,
)

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}


def cfg(**over):
    base = dict(
        arch="vit_base_patch16_224", img_size=32, num_classes=10, drop_path_rate=0.0,
        global_pool="token", timm_kwargs=dict(TINY), checkpoint=None, head_init_std=None,
    )
    base.update(over)
    return OmegaConf.create(base)


def mae_pretrain_state_dict(img_size=48, embed_dim=64):
    """A tiny MAE pretrain checkpoint's `model`: encoder (final `norm`, no head) + decoder + mask_token."""
    torch.manual_seed(0)
    enc = build_model(cfg(img_size=img_size, num_classes=0, timm_kwargs={**TINY, "embed_dim": embed_dim}))
    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    assert "norm.weight" in sd and "head.weight" not in sd
    # MAE's encoder uses timm's names; the pretrain-only parts:
    d = 32
    sd["mask_token"] = torch.randn(1, 1, d)
    sd["decoder_embed.weight"] = torch.randn(d, embed_dim)
    sd["decoder_embed.bias"] = torch.randn(d)
    sd["decoder_pos_embed"] = torch.randn(1, 1 + (img_size // 8) ** 2, d)
    sd["decoder_blocks.0.norm1.weight"] = torch.randn(d)
    sd["decoder_norm.weight"] = torch.randn(d)
    sd["decoder_pred.weight"] = torch.randn(8 * 8 * 3, d)
    sd["decoder_pred.bias"] = torch.randn(8 * 8 * 3)
    return sd


def save_mae(path, sd):
    # as MAE's misc.save_model writes it: model, optimizer, epoch, scaler, args (a Namespace)
    torch.save({"model": sd, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}, path)
    return path


def test_mae_pretrain_into_global_pool_model(tmp_path):
    src = mae_pretrain_state_dict(img_size=48)  # grid 6x6 -> model grid 4x4
    path = save_mae(tmp_path / "mae_pretrain.pth", src)
    torch.manual_seed(1)
    model = build_model(cfg(global_pool="avg", num_classes=100, head_init_std=2e-5))
    # build_model loaded it; do it again to see the report (same result)
    report = load_pretrained(model, path, head_init_std=2e-5)

    assert report.format.startswith("MAE pretrain dict['model']")
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert set(report.ignored) == {k for k in src if k.startswith("decoder_")} | {"mask_token", "norm.weight", "norm.bias"}
    assert report.pos_embed_resized == ((1, 37, 64), (1, 17, 64))
    assert report.head_reinit

    got = model.state_dict()
    for k, v in src.items():
        if k.startswith(("decoder_", "mask_token", "norm.", "pos_embed")):
            continue
        assert torch.equal(got[k], v), k
    want_pos = resample_abs_pos_embed(src["pos_embed"], new_size=[4, 4], num_prefix_tokens=1,
                                      interpolation="bicubic")
    assert torch.allclose(got["pos_embed"], want_pos, atol=0, rtol=0)
    assert torch.equal(got["pos_embed"][:, :1], src["pos_embed"][:, :1])  # cls position kept
    # fc_norm fresh (LayerNorm init), head trunc_normal(2e-5), bias 0
    assert torch.equal(got["fc_norm.weight"], torch.ones(64)) and torch.equal(got["fc_norm.bias"], torch.zeros(64))
    w = got["head.weight"]
    assert w.shape == (100, 64)
    assert 1.8e-5 < w.std().item() < 2.2e-5 and abs(w.mean().item()) < 2e-6
    assert torch.equal(got["head.bias"], torch.zeros(100))
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_mae_finetuned_checkpoint_keeps_fc_norm_and_drops_other_head(tmp_path):
    torch.manual_seed(0)
    src = build_model(cfg(global_pool="avg", num_classes=7))
    with torch.no_grad():
        src.fc_norm.weight.uniform_()
    torch.save({"model": src.state_dict()}, tmp_path / "ft.pth")  # MAE / DeiT fine-tuned format
    model = build_model(cfg(global_pool="avg", num_classes=10))
    report = load_pretrained(model, tmp_path / "ft.pth")
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert sorted(report.ignored) == ["head.bias", "head.weight"]  # 7 classes, not 10
    assert torch.equal(model.fc_norm.weight, src.fc_norm.weight)


@pytest.mark.parametrize("container", ["plain", "state_dict", "model", "state_dict_ema", "safetensors"])
def test_round_trip_gives_identical_outputs(tmp_path, container):
    torch.manual_seed(0)
    src = build_model(cfg()).eval()
    sd = src.state_dict()
    if container == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(sd if container == "plain" else {container: sd, "epoch": 3}, path)
    torch.manual_seed(1)
    model = build_model(cfg(checkpoint=str(path))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert checkpoint_summary(path)["tensors"] == len(sd)


def test_ddp_and_lightning_prefixes_are_stripped(tmp_path):
    src = build_model(cfg())
    torch.save({"state_dict": {"model." + k: v for k, v in src.state_dict().items()}}, tmp_path / "a.pth")
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        model = build_model(cfg(checkpoint=str(tmp_path / name)))
        assert torch.equal(model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_wrong_architecture_names_file_key_and_shapes(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save({"model": mae_pretrain_state_dict(img_size=32, embed_dim=96)}, path)
    with pytest.raises(CheckpointError) as e:
        build_model(cfg(global_pool="avg", checkpoint=str(path), head_init_std=2e-5))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "'cls_token'" in msg and "(1, 1, 96)" in msg and "(1, 1, 64)" in msg


def test_other_patch_size_is_refused_not_resampled(tmp_path):
    src = build_model(cfg(timm_kwargs={**TINY, "patch_size": 4}))
    torch.save(src.state_dict(), tmp_path / "p4.pth")
    with pytest.raises(CheckpointError, match=r"'patch_embed.proj.weight' has shape \(64, 3, 4, 4\).*\(64, 3, 8, 8\)"):
        build_model(cfg(checkpoint=str(tmp_path / "p4.pth")))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        build_model(cfg(checkpoint=str(path)))


def test_unexpected_key_is_listed(tmp_path):
    sd = mae_pretrain_state_dict(img_size=32)
    sd["blocks.0.attn.extra_scale"] = torch.ones(1)
    sd["dist_token"] = torch.zeros(1, 1, 64)
    path = save_mae(tmp_path / "extra.pth", sd)
    with pytest.raises(CheckpointError) as e:
        build_model(cfg(global_pool="avg", checkpoint=str(path)))
    msg = str(e.value)
    assert "blocks.0.attn.extra_scale" in msg and "dist_token" in msg and "decoder" not in msg


def test_missing_weights_other_than_head_and_fc_norm(tmp_path):
    sd = mae_pretrain_state_dict(img_size=32)
    del sd["blocks.1.mlp.fc2.weight"]
    path = save_mae(tmp_path / "short.pth", sd)
    with pytest.raises(CheckpointError, match=r"lacks weights .*blocks\.1\.mlp\.fc2\.weight"):
        build_model(cfg(global_pool="avg", checkpoint=str(path)))
    # a global-pool (fc_norm) checkpoint into a token-pool model: its final norm is missing
    src = build_model(cfg(global_pool="avg"))
    torch.save(src.state_dict(), tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match=r"norm\.weight.*global_pool"):
        build_model(cfg(global_pool="token", checkpoint=str(tmp_path / "gap.pth")))


def test_unreadable_and_unsafe_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot be read"):
        build_model(cfg(checkpoint=str(tmp_path / "junk.pth")))
    torch.save({"model": build_model(cfg()).state_dict(), "obj": Unsafe()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="not weights"):
        build_model(cfg(checkpoint=str(tmp_path / "unsafe.pth")))
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        build_model(cfg(checkpoint=str(tmp_path / "empty.pth")))


class Unsafe:
    pass


def test_checkpoint_summary(tmp_path):
    path = save_mae(tmp_path / "mae.pth", mae_pretrain_state_dict(img_size=48))
    s = checkpoint_summary(path)
    assert s["format"] == "MAE pretrain dict['model']"
    assert (s["embed_dim"], s["depth"], s["patch_size"], s["grid"], s["prefix_tokens"]) == (64, 2, (8, 8), (6, 6), 1)
    assert s["pool"] == "token" and s["num_classes"] is None and s["decoder"] is True
    sd, fmt = read_checkpoint(path, meta=True)
    assert all(v.is_meta for v in sd.values())


def test_meta_device_builds_big_models_and_checks_checkpoints(tmp_path):
    huge = build_model(
        cfg(arch="vit_huge_patch14_224", img_size=224, num_classes=1000, global_pool="avg", timm_kwargs={},
            head_init_std=2e-5),
        device="meta",
    )
    assert huge.pos_embed.is_meta and sum(p.numel() for p in huge.parameters()) > 600e6
    path = save_mae(tmp_path / "mae.pth", mae_pretrain_state_dict(img_size=48))
    safe = tmp_path / "mae.safetensors"
    save_file(mae_pretrain_state_dict(img_size=48), str(safe))
    for p in (path, safe):
        model = build_model(cfg(global_pool="avg", checkpoint=str(p), head_init_std=2e-5), device="meta")
        assert model.head.weight.is_meta
    wide = tmp_path / "wide.pth"
    torch.save({"model": mae_pretrain_state_dict(img_size=32, embed_dim=96)}, wide)
    with pytest.raises(CheckpointError, match="cls_token"):
        build_model(cfg(global_pool="avg", checkpoint=str(wide)), device="meta")


def test_head_init_without_checkpoint_and_allowed_set():
    torch.manual_seed(0)
    model = build_model(cfg(num_classes=200, head_init_std=2e-5))
    assert 1.8e-5 < model.head.weight.std().item() < 2.2e-5
    assert torch.equal(model.head.bias, torch.zeros(200))
    assert ALLOWED_MISSING >= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


@pytest.mark.parametrize("over, error", [
    ({"arch": "vit_base_patch16_2244"}, "model.arch='vit_base_patch16_2244' is not a timm model (did you mean "
                                        "'vit_base_patch16_224'?)"),
    ({"img_size": 36}, "model.img_size=36 is not allowed for vit_base_patch16_224 with 8x8 patches: use a multiple of the "
                       "patch size"),
    ({"timm_kwargs": {**TINY, "depht": 2}}, "vit_base_patch16_224 does not take them (VisionTransformer.__init__() got "
                                            "an unexpected keyword argument 'depht')"),
])
def test_a_model_timm_would_refuse_later_is_one_config_error(over, error):
    """timm builds a model for any image size and fails at its first forward; here the config is refused at once."""
    with pytest.raises(ConfigError) as refused:
        build_model(cfg(**over), device="meta")
    assert error in str(refused.value) and "\n" not in str(refused.value)
    assert build_model(cfg(img_size=40), device="meta").patch_embed.grid_size == (5, 5)  # any multiple is a model
