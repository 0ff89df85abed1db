"""Export of a checkpoint trained on digits: plain timm, load_exported and ONNX Runtime."""
import copy
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from tome_train import export as export_module
from tome_train.cli import train
from tome_train.config import load_config
from tome_train.export import ExportError, export, export_onnx, load_exported, main
from tome_train.module import ToMeClassifier
from tome_train.tome import ScheduleError, set_r, tome_state

from conftest import ROOT

# the digits recipe with an EMA, as short as a run with a trade-off report can be
EMA_RUN = ["trainer.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "optim.ema_decay=0.9",
           "tradeoff.r_values=[0,6]", "tradeoff.bench_steps=1", "tradeoff.num_vis_images=1", "wandb.mode=disabled"]


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["--checkpoint", str(digits_run.last), "--out", str(out), "--onnx"]) == 0
    return out


def edited_checkpoint(digits_run, path, edit):
    """The digits run's last checkpoint with its run config changed by ``edit``, saved at ``path``."""
    ckpt = torch.load(digits_run.last, map_location="cpu", weights_only=False)
    edit(ckpt["hyper_parameters"]["config"])
    torch.save(ckpt, path)
    return path


def refusal(args, capsys) -> str:
    """The one line ``export`` refuses ``args`` with (exit 2)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """The run folder of :data:`EMA_RUN`: its checkpoints and trade-off report, at its last step (2)."""
    run_dir = tmp_path_factory.mktemp("ema_run")
    train(load_config(None, [*EMA_RUN, f"output_dir={run_dir}"]))
    return run_dir


def exported_tradeoff(checkpoint, out, capsys, *flags) -> tuple[list[dict] | None, str]:
    """The trade-off table of ``checkpoint`` exported into ``out`` and the line export said it with, if any."""
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), *flags]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "trade-off" in line]
    return json.loads((out / "tome.json").read_text())["tradeoff"], "\n".join(said)


@pytest.fixture(scope="module")
def trained(digits_run):
    module = ToMeClassifier.load_from_checkpoint(digits_run.last, map_location="cpu", weights_only=False)
    return module.model.eval()


def test_export_writes_weights_configs_and_onnx(exported, digits_run):
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.onnx", "model.safetensors", "tome.json"]
    umask = os.umask(0)
    os.umask(umask)
    # others may read it as the umask allows (the folder was mkdtemp's 0700, the weights safetensors' 0600)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in exported.iterdir()} == {0o666 & ~umask}
    config = json.loads((exported / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    # the run's: its data's class names, its recipe; not the architecture's published weights' tag and license
    assert config["label_names"] == [str(d) for d in range(10)]
    assert config["pretrained_cfg"]["tag"] == digits_run.cfg.name and "license" not in config["pretrained_cfg"]
    tome = json.loads((exported / "tome.json").read_text())
    assert tome["schedule"] == [6] * 6 and tome["prop_attn"] is True and tome["trained_r"] == 6
    assert [row["r"] for row in tome["tradeoff"]] == [0, 6, 8]


def test_plain_timm_without_tome_train_matches_at_r0(exported, trained, tmp_path):
    images = torch.randn(3, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    # A fresh interpreter in which tome_train cannot be imported at all.
    script = textwrap.dedent(f"""
        import sys, json, torch
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'tome_train':
                    raise ImportError('tome_train is blocked')
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]
        import timm
        cfg = json.load(open({str(exported / 'config.json')!r}))
        model = timm.create_model(cfg['architecture'], pretrained=True, num_classes=cfg['num_classes'],
                                  pretrained_cfg_overlay=dict(file={str(exported / 'model.safetensors')!r},
                                                              num_classes=cfg['num_classes']),
                                  **{{k: v for k, v in cfg['model_args'].items() if k != 'num_classes'}}).eval()
        local = timm.create_model('local-dir:{exported}', pretrained=True).eval()
        images = torch.load({str(tmp_path / 'images.pt')!r})
        assert local.pretrained_cfg['label_names'] == [str(d) for d in range(10)]
        with torch.no_grad():
            torch.save((model(images), local(images)), {str(tmp_path / 'logits.pt')!r})
        assert 'tome_train' not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    plain, local = torch.load(tmp_path / "logits.pt")
    set_r(trained, 0)
    with torch.no_grad():
        expected = trained(images)
    set_r(trained, 6)
    assert torch.allclose(plain, expected, atol=1e-5)
    assert torch.allclose(local, expected, atol=1e-5)


def test_load_exported_matches_trained_model_at_stored_r(exported, trained):
    model = load_exported(exported)
    assert tome_state(model).schedule == [6] * 6
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), trained(images), atol=1e-6)


def test_onnx_runtime_matches(exported, trained):
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = trained(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert abs(got - expected).max() <= 1e-4
    # what the ONNX file alone tells its users: the classes, the input's preprocessing, the ToMe schedule it runs
    about = session.get_modelmeta().custom_metadata_map
    assert about["recipe"] == "digits_vit_r6" and json.loads(about["label_names"]) == [str(d) for d in range(10)]
    assert json.loads(about["preprocessing"]) == {"input_size": [3, 32, 32], "interpolation": "bilinear",
                                                  "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert json.loads(about["tome"])["schedule"] == [6] * 6 and json.loads(about["tome"])["prop_attn"] is True


def test_torch_export_records_pytorchs_ops_not_the_librarys(trained):
    """``torch.export`` (AOTInductor, ExecuTorch, ONNX's dynamo exporter) records the matching and the merge as
    PyTorch's ops: the custom ops that ``torch.compile``'s graphs call run tome_train's Python, which an exported
    program does not have. The program computes the trained model's logits, merges included, at any batch size."""
    images = torch.randn(2, 3, 32, 32)
    program = torch.export.export(trained, (images,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    graphs = [m.graph for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = {str(node.target) for graph in graphs for node in graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "tome_train" in t]
    assert {"aten.max.dim", "aten.argsort.stable", "aten.scatter_add_.default", "aten.index_select.default"} <= targets
    with torch.no_grad():
        for batch in (1, 3):  # any batch size, as a server sends them
            images = torch.randn(batch, 3, 32, 32)
            assert torch.allclose(program.module()(images), trained(images), atol=1e-6)
    program = torch.export.export(trained, (images,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    copy.deepcopy(trained)  # right after an export: its state held the export's symbolic values, which no copy takes


def test_export_at_another_r_and_ema_flag(digits_run, tmp_path):
    result = export(digits_run.last, tmp_path / "r2", r=2)
    assert json.loads((tmp_path / "r2" / "tome.json").read_text())["schedule"] == [2] * 6
    assert "model.onnx" not in result["files"]
    with pytest.raises(ExportError, match="no EMA weights"):
        export(digits_run.last, tmp_path / "ema", ema=True)
    assert not (tmp_path / "ema").exists()


def test_bad_input_is_one_line_exit_2_and_keeps_dir(digits_run, tmp_path, capsys):
    good = tmp_path / "good"
    export(digits_run.last, good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    other = edited_checkpoint(digits_run, tmp_path / "other.ckpt",
                              lambda config: config["model"]["timm_kwargs"].update(embed_dim=48))
    cases = [
        (["--checkpoint", str(tmp_path / "missing.ckpt")], "no such file"),
        (["--checkpoint", str(tmp_path)], "is a folder; pass a checkpoint file (a run's checkpoints/last.ckpt)"),
        (["--checkpoint", str(not_ckpt)], "not a checkpoint"),
        (["--checkpoint", str(other)], "weights do not fit"),
        (["--checkpoint", str(digits_run.last), "--r", "-3"], "r=-3 is not allowed"),
        (["--checkpoint", str(digits_run.last), "--r", "1,1,1,1,1,1,1,1"], "the model has 6 blocks"),
        (["--checkpoint", str(digits_run.last), "--r", "33"], "r=33 is not possible for this model"),
    ]
    for args, needle in cases:
        assert needle in refusal([*args, "--out", str(good)], capsys)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    # a folder or file of the user's is never replaced by an export; an empty folder is filled
    for out, needle in ((not_ckpt, "is a file; pass a folder"), (tmp_path, "holds good (and 2 more), which an export"),
                        (not_ckpt / "model", f"is under the file {not_ckpt}; pass a folder")):  # was mkdir's traceback
        assert needle in refusal(["--checkpoint", str(digits_run.last), "--out", str(out)], capsys)
    assert not_ckpt.read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "notes.ckpt", "other.ckpt"]
    (tmp_path / "empty").mkdir()
    assert main(["--checkpoint", str(digits_run.last), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "tome.json").is_file()


def test_a_command_line_argparse_refuses_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--checkpoint", "x.ckpt", "--onnx=yes"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("error: argument --onnx: ignored explicit argument 'yes' (see train.py export "
                                       "--help)\n")


def test_out_replaces_an_earlier_export_only_when_it_holds_nothing_else(digits_run, tmp_path, capsys):
    """A folder with a tome.json was taken for an earlier export and replaced whole: the checkpoint being exported
    and the notes beside it were deleted."""
    run = tmp_path / "run"
    export(digits_run.last, run)
    (run / "last.ckpt").write_bytes(digits_run.last.read_bytes())
    (run / "NOTES.md").write_text("notes")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "tome.json").write_text("{}")
    (fake / "data.txt").write_text("precious")
    downloaded = tmp_path / "downloaded"  # a timm model from the Hub: config.json and weights, no tome.json
    export(digits_run.last, downloaded)
    (downloaded / "tome.json").unlink()
    before = {folder: sorted(p.name for p in folder.iterdir()) for folder in (run, fake, downloaded)}
    for folder, needle in ((run, "holds NOTES.md (and 1 more), which an export does not write"),
                           (fake, "holds data.txt, which an export does not write"),
                           (downloaded, "holds no tome.json, so is no earlier export")):
        assert needle in refusal(["--checkpoint", str(run / "last.ckpt"), "--out", str(folder)], capsys)
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in before} == before
    (run / "last.ckpt").unlink()
    (run / "NOTES.md").unlink()
    assert main(["--checkpoint", str(digits_run.last), "--out", str(run), "--r", "2"]) == 0  # an earlier export alone
    assert json.loads((run / "tome.json").read_text())["r"] == 2


def test_out_dot_and_a_link_are_the_folders_they_name(digits_run, tmp_path, monkeypatch, capsys):
    """``--out .`` crashed (``PosixPath('.') has an empty name``); ``--out LINK`` to an earlier export crashed after
    writing (``rmtree`` of a link), leaving LINK a folder and the link's target behind as debris."""
    here = tmp_path / "here"
    here.mkdir()
    for r in ("2", "3"):  # an empty folder, then the earlier export there
        # (from a fresh shell: the export replaced the folder, and this process's current one is the deleted old one)
        monkeypatch.chdir(here)
        assert main(["--checkpoint", str(digits_run.last), "--out", ".", "--r", r]) == 0
        assert json.loads((here / "tome.json").read_text())["r"] == int(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    assert "--out '': names no folder" in refusal(["--checkpoint", str(digits_run.last), "--out", ""], capsys)
    link = tmp_path / "link"
    link.symlink_to(here)
    assert main(["--checkpoint", str(digits_run.last), "--out", str(link), "--r", "4"]) == 0
    assert link.is_symlink() and link.resolve() == here and json.loads((link / "tome.json").read_text())["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "link"]


def test_failed_export_leaves_no_folders_made_for_it(digits_run, tmp_path, monkeypatch, capsys):
    """The parents of a new ``--out`` were made before the ONNX check, and stayed when it failed."""
    monkeypatch.setattr(export_module, "export_onnx", lambda model, img_size, path: 1.0)
    out = tmp_path / "new" / "sub" / "model"
    assert "ONNX check failed" in refusal(["--checkpoint", str(digits_run.last), "--out", str(out), "--onnx"], capsys)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_without_a_usable_run_config_is_one_line(digits_run, tmp_path, capsys):
    """An unknown or non-ViT ``model.arch`` and a config without ``model`` were tracebacks (ConfigError, OmegaConf's
    ConfigAttributeError)."""
    def arch(name):
        return lambda config: config["model"].update(arch=name)

    cases = [(arch("vit_nonexistent_foo"), "model.arch='vit_nonexistent_foo' is not a timm model"),
             (arch("resnet18"), "model.timm_kwargs={'patch_size': 4"),  # a ViT's kwargs: ResNet takes none
             (lambda config: config.pop("model"), "not a tome-train run's config (Missing key model)"),
             (lambda config: config.pop("tome"), "not a tome-train run's config (Missing key tome)")]
    for i, (edit, needle) in enumerate(cases):
        checkpoint = edited_checkpoint(digits_run, tmp_path / f"{i}.ckpt", edit)
        err = refusal(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")], capsys)
        assert err.startswith(f"error: --checkpoint {checkpoint}: ") and needle in err, err
    assert not (tmp_path / "out").exists()


def test_refusals_name_where_the_value_came_from_in_a_line_of_its_own_length(digits_run, tmp_path, capsys):
    """A run's own tome.r_eval was refused as ``--r``, which was not given; the weights of a deeper model listed
    every missing key (about 2 KB)."""
    checkpoint = edited_checkpoint(digits_run, tmp_path / "r_eval.ckpt", lambda config: config["tome"].update(r_eval=50))
    err = refusal(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")], capsys)
    assert err.startswith(f"error: --checkpoint {checkpoint}: tome.r_eval: r=50 is not possible for this model"), err
    deeper = edited_checkpoint(digits_run, tmp_path / "deeper.ckpt",
                               lambda config: config["model"]["timm_kwargs"].update(depth=12))
    err = refusal(["--checkpoint", str(deeper), "--out", str(tmp_path / "out")], capsys)
    assert "blocks.6.norm1.weight (and 71 more) is in the model, not in the checkpoint" in err and len(err) < 300, err
    assert not (tmp_path / "out").exists()


def test_decreasing_schedule_is_stored_as_the_text_r_takes_back(digits_run, tmp_path, capsys):
    """tome.json stored ``16@-1`` as ``[16, -1.0]``, a per-layer list to anyone reading it back (load_exported
    refused it: r[1]=-1.0), and the trained ``{r: 3, inflect: -1}`` as a dict neither ``--r`` nor load_exported
    took; messages showed the tuple ``(32, -1.0)``."""
    checkpoint = edited_checkpoint(digits_run, tmp_path / "decreasing.ckpt",
                                   lambda config: config["tome"].update(r_train={"r": 3, "inflect": -1}))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--r", "16@-1"]) == 0
    tome = json.loads((out / "tome.json").read_text())
    assert (tome["r"], tome["trained_r"]) == ("16@-1", "3@-1") and tome["schedule"] == [32, 25, 19, 12, 6, 0]
    for stored in (tome["r"], tome["trained_r"]):
        assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "again"), "--r", stored]) == 0
        assert tome_state(load_exported(out, r=stored)).schedule == json.loads(
            (tmp_path / "again" / "tome.json").read_text())["schedule"]
    assert "--r: r=32@-1 is not possible" in refusal(["--checkpoint", str(checkpoint), "--out", str(out), "--r",
                                                      "32@-1"], capsys)


def test_load_exported_refuses_an_r_the_model_cannot_take(exported):
    """``export --r 33`` was refused and ``load_exported(DIR, r=33)`` ran, capped at 32 in every layer."""
    with pytest.raises(ScheduleError, match="r=33 is not possible for this model.*use at most 32"):
        load_exported(exported, r=33)
    assert tome_state(load_exported(exported, r="[8, 8, 4]")).schedule == [8, 8, 4, 0, 0, 0]


def test_onnx_check_is_the_same_in_every_export(trained, tmp_path):
    """The check drew unseeded inputs: the difference the export printed varied run to run (9.5e-7 to 2.7e-6)."""
    assert export_onnx(trained, 32, tmp_path / "a.onnx") == export_onnx(trained, 32, tmp_path / "b.onnx")


def test_an_ema_export_carries_no_table_of_the_raw_weights(ema_run, tmp_path, capsys):
    """``--ema`` wrote tome.json's weights "ema" with the trade-off the sweep measured on the raw weights."""
    last = ema_run / "checkpoints" / "last.ckpt"
    table, said = exported_tradeoff(last, tmp_path / "raw", capsys)
    assert [row["r"] for row in table] == [0, 6] and said == ""
    table, said = exported_tradeoff(last, tmp_path / "ema", capsys, "--ema")
    assert json.loads((tmp_path / "ema" / "tome.json").read_text())["weights"] == "ema" and table is None
    assert said == (f"tome.json holds no trade-off table: {ema_run / 'tradeoff.json'} was measured on the raw weights, "
                    f"not the ema ones")


def test_a_checkpoint_of_another_step_than_the_tables_carries_none(ema_run, tmp_path, capsys):
    """The run folder's table went into every export: after a ``--resume`` that changed ``tome.r_train`` with the
    sweep off, the earlier weights' table; for an earlier epoch's checkpoint, the final weights' table."""
    run = tmp_path / "run"
    shutil.copytree(ema_run, run)
    last, epoch0 = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "epoch0.ckpt"
    shutil.copy2(last, epoch0)  # as a best-*.ckpt that later epochs did not better stays
    record = run / "tradeoff.json"
    resumed = [*EMA_RUN, "trainer.epochs=2", "tome.r_train=8", f"output_dir={run}"]
    train(load_config(None, [*resumed, "tradeoff.enabled=false"]), resume=str(last))
    assert exported_tradeoff(last, tmp_path / "resumed", capsys) == (
        None, f"tome.json holds no trade-off table: {record} was measured at step 2, not the checkpoint's 4")
    assert exported_tradeoff(epoch0, tmp_path / "epoch0", capsys)[0] is not None  # the weights it was measured on
    train(load_config(None, resumed), resume=str(last))  # the finished run again, measuring its final weights
    assert [row["r"] for row in exported_tradeoff(last, tmp_path / "final", capsys)[0]] == [0, 6, 8]
    assert exported_tradeoff(epoch0, tmp_path / "epoch0", capsys) == (
        None, f"tome.json holds no trade-off table: {record} was measured at step 4, not the checkpoint's 2")


def test_a_run_folder_from_before_the_record_gets_no_table(digits_run, tmp_path, capsys):
    """A ``tradeoff.csv`` alone does not say which weights it was measured on: it cannot be matched to any."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(digits_run.last, run / "checkpoints" / "last.ckpt")
    shutil.copy(digits_run.run_dir / "tradeoff.csv", run)
    assert exported_tradeoff(run / "checkpoints" / "last.ckpt", tmp_path / "out", capsys) == (
        None, f"tome.json holds no trade-off table: {run / 'tradeoff.csv'} does not say which weights it was measured "
              f"on, so cannot be matched to these")
    (run / "tradeoff.json").write_text('{"weights": "raw"}')  # edited by hand: a line, not a traceback
    assert exported_tradeoff(run / "checkpoints" / "last.ckpt", tmp_path / "out", capsys) == (
        None, f"tome.json holds no trade-off table: {run / 'tradeoff.json'} cannot be read (KeyError: 'global_step')")
