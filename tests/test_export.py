"""Export of a checkpoint trained on digits: plain timm, load_exported and ONNX Runtime."""
import copy
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from tome_train.export import ExportError, export, load_exported, main
from tome_train.module import ToMeClassifier
from tome_train.tome import set_r

from conftest import ROOT


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["--checkpoint", str(digits_run.last), "--out", str(out), "--onnx"]) == 0
    return out


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
    assert model._tome_state.schedule == [6] * 6
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
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(digits_run.last, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"]["model"]["timm_kwargs"]["embed_dim"] = 48
    torch.save(ckpt, other)
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
        assert main([*args, "--out", str(good)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    # a folder or file of the user's is never replaced by an export; an empty folder is filled
    for out, needle in ((not_ckpt, "is a file; pass a folder"), (tmp_path, "holds files that are not an export"),
                        (not_ckpt / "model", f"is under the file {not_ckpt}; pass a folder")):  # was mkdir's traceback
        assert main(["--checkpoint", str(digits_run.last), "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err
    assert not_ckpt.read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "notes.ckpt", "other.ckpt"]
    (tmp_path / "empty").mkdir()
    assert main(["--checkpoint", str(digits_run.last), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "tome.json").is_file()
