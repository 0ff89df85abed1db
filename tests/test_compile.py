"""torch.compile sees a ToMe model as one graph: no graph break, no recompilation between calls."""
import re

import timm
import torch
import torch._dynamo as dynamo

from tome_train.tome import apply_tome


def _model():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=10)
    return apply_tome(model, r=8, prop_attn=True)


def test_patched_model_traces_as_one_graph_without_breaks():
    model = _model().eval()
    dynamo.reset()
    explained = dynamo.explain(model)(torch.randn(4, 3, 64, 64))
    assert explained.graph_count == 1
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


def _compiled_graph_targets() -> list:
    """The functions and methods the one graph ``torch.compile`` makes of a patched model's inference calls."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = _model().eval()
    dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randn(4, 3, 64, 64))
    (graph,) = graphs
    return [node.target for node in graph.graph.nodes if node.op in ("call_function", "call_method")]


def test_the_merge_is_two_ops_in_the_graph():
    """Each merging layer's matching, rows and weights, and its merge, reach the compiler as two ops it calls and
    does not trace (``tome_train::plan_layer``, ``tome_train::weighted_merge``: no sorts, gathers or scatters of
    their own per token count), which pass ``torch.library.opcheck`` (declared shapes and dtypes, no aliasing,
    the merge's gradient through its backward op)."""
    from tome_train.tome import bipartite_soft_matching
    from tome_train.tome.merge import compiled_plan_layer, compiled_weighted_merge

    targets = _compiled_graph_targets()
    assert targets.count(torch.ops.tome_train.plan_layer.default) == 4  # every layer merges
    assert targets.count(torch.ops.tome_train.weighted_merge.default) == 4
    names = [target if isinstance(target, str) else getattr(target, "__name__", str(target)) for target in targets]
    assert not [name for name in names if re.search(r"sort|gather|index_select|scatter|index_add|take_along", name)]
    keys = torch.randn(2, 3, 17, 8)
    torch.library.opcheck(compiled_plan_layer, (keys, None, 4, 1, torch.float32))
    torch.library.opcheck(compiled_plan_layer, (keys, torch.randint(1, 4, (34,)).half(), 8, 1, torch.float16))
    merge = bipartite_soft_matching(keys.mean(1), 4)
    weight, _ = merge.weights(torch.randint(1, 4, (2, 17, 1)).float(), torch.float32)
    rows = torch.randn(34, 5, requires_grad=True)
    for branch in (None, torch.randn(34, 5, requires_grad=True), torch.randn(34, 5).half().requires_grad_()):
        torch.library.opcheck(compiled_weighted_merge, (rows, merge.perm, merge.dest, weight, merge.num_kept, branch))


def test_the_ops_reach_the_graph_where_dynamo_folds_is_exporting_to_true(monkeypatch):
    """Dynamo in torch 2.11 (the GPU machine's) folds ``torch.compiler.is_exporting()`` to True inside every trace,
    ``torch.compile``'s included; the library tells the two apart by the flag ``torch.export`` sets around its trace,
    so a compiled graph still calls the ops there (``torch.export`` records PyTorch's ops: tests/test_export.py)."""
    # 2.11's answer: True in any trace (a new function: Dynamo knows torch.compiler's own by identity)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    targets = _compiled_graph_targets()
    assert targets.count(torch.ops.tome_train.plan_layer.default) == 4
    assert targets.count(torch.ops.tome_train.weighted_merge.default) == 4


def test_compiled_model_matches_and_never_recompiles():
    torch.manual_seed(0)
    model = _model()
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    images = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(images), model(images), atol=1e-5)
    with torch.no_grad(), dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            compiled(torch.randn(4, 3, 64, 64))
    model.train()
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(images).sum().backward()  # the training graph (merges with gradients) compiles too
    with dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            compiled(torch.randn(4, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_benchmark_compiles_both_sides_with_inductor(tmp_path):
    """The real compiler (inductor, C++ kernels on a CPU): same merges and logits as eager fp32,
    no graph compiled during the timed steps, each side's compile time in the row."""
    import json

    from tome_train import bench

    out = tmp_path / "b.json"
    rc = bench.main(["--model", "test_vit", "--img-size", "64", "--device", "cpu", "--batch-size", "2",  # 6 blocks
                     "--r", "2", "--mode", "infer", "--warmup", "1", "--steps", "2", "--compile",
                     "--output", str(out), "--quiet"])
    assert rc == 0
    row, = json.loads(out.read_text())["results"]
    assert row["compile"] == "default" and row["recompiles"] == 0
    assert row["baseline_first_graphs"] >= 1 and row["tome_first_graphs"] >= 1  # compiled in the first step
    assert row["same_merges"] == 1.0 and 0 < row["tome_max_diff"] < 1e-5 and row["baseline_max_diff"] < 1e-5
    # the first call holds the compilation: far longer than a step of this tiny model
    assert row["tome_first_s"] > 10 * row["tome_ms"] / 1e3 and row["baseline_first_s"] > 10 * row["baseline_ms"] / 1e3


def _compiled_regions_infer_as_eager():
    """A model under compile_tome and an eager copy: logits as eager's in inference, in at most three graphs,
    none added by other batch sizes or later calls. Returns both models."""
    import copy

    from torch._dynamo.utils import counters

    from tome_train.tome import compile_tome

    torch.manual_seed(0)
    model = _model().eval()
    eager = copy.deepcopy(model)
    dynamo.reset()
    counters.clear()
    assert compile_tome(model) is model
    with torch.no_grad():
        images = torch.randn(4, 3, 64, 64)
        assert (model(images) - eager(images)).abs().max() <= 1e-5
        assert counters["stats"]["unique_graphs"] <= 3
        with dynamo.config.patch(error_on_recompile=True):
            for batch in (4, 3, 6):
                x = torch.randn(batch, 3, 64, 64)
                assert (model(x) - eager(x)).abs().max() <= 1e-5
    return model, eager


def test_compile_tome_regions_match_eager_and_never_recompile():
    """compile_tome: attention and MLP halves compiled once (dynamic token count) for every block, merging
    eager between them. Three graphs at most (attention with and without sizes, MLP), then none for other
    batch sizes, later calls or the training step; logits and gradients as eager."""
    import pickle

    from tome_train.tome import compile_tome

    model, eager = _compiled_regions_infer_as_eager()
    images = torch.randn(4, 3, 64, 64)
    model.train()
    eager.train()
    model(images).square().mean().backward()
    eager(images).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5, name
    # copies and pickles keep the setting, not the compiled functions of this process
    clone = pickle.loads(pickle.dumps(model))
    assert clone._tome_state.compile_mode == "default" and clone._tome_state._compiled == {}
    compile_tome(model, None)
    assert model._tome_state.regions()[0].__name__ == "attention_branch"


def test_compile_tome_takes_the_norm_from_the_merge_without_recompiling(monkeypatch):
    """Where the merge hands the MLP its norm (on a GPU, in inference; here on the CPU, with a candidate that is the
    path's reference: the merge, then the norm), the compiled MLP region starts from it: every merging block's norm comes from the
    merge, still in at most three graphs, none added by other batch sizes, logits as eager's."""
    from tome_train.tome import merge, timm_patch

    monkeypatch.setattr(merge._merge_norm_rows, "device_types", ("cpu",))
    monkeypatch.setattr(merge._merge_norm_rows, "choices", {})

    def same_as_reference(*args):  # no kernel to run here: a candidate that is the reference
        return merge._weighted_merge_norm(*args)

    monkeypatch.setattr(merge._merge_norm_rows, "candidate", same_as_reference)
    calls = []
    monkeypatch.setattr(timm_patch, "merge_wavg_norm", lambda *args: calls.append(1) or merge.merge_wavg_norm(*args))
    _compiled_regions_infer_as_eager()
    assert len(calls) == 2 * 4 * 4  # compiled and eager, four blocks, four forwards


def test_compile_tome_rejects_unknown_mode():
    import pytest

    from tome_train.tome import compile_tome

    with pytest.raises(ValueError, match="mode='fast' is not allowed: use one of default, reduce-overhead"):
        compile_tome(_model(), mode="fast")
