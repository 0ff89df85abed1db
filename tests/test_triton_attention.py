"""The Triton proportional-attention kernels (run here by Triton's interpreter, which ``tests/conftest.py``
turns on) against the explicit formula in float64, SDPA, and the meaning of a key's size; the backward against
float64 autograd of the formula."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from attention_inputs import B, H, packed  # noqa: E402
from tome_train.tome.attention import packed_heads  # noqa: E402
from tome_train.tome.triton_attention import (  # noqa: E402
    size_biased_attention, size_biased_attention_forward, size_biased_attention_trainable,
    triton_proportional_attention, triton_proportional_attention_trainable)

pytestmark = pytest.mark.usefixtures("one_thread")

def packed_qkv(num_tokens: int, head_dim: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``q, k, v`` ``[B, H, N, D]`` as timm makes them (strided views of :func:`packed`'s qkv) and the sizes."""
    qkv, size = packed(num_tokens, head_dim, dtype, seed)
    return (*packed_heads(qkv, H), size)


def explicit(q, k, v, size, scale):
    """``softmax(q k^T * scale + log(size)) v`` written out in float64, ``log(size)`` rounded to ``q``'s dtype
    (the bias as SDPA's mask holds it)."""
    size = size.double().log().to(q.dtype)
    q, k, v, size = (t.double() for t in (q, k, v, size))
    return ((q @ k.transpose(-1, -2)) * scale + size[:, None, None, :]).softmax(-1) @ v


@pytest.mark.parametrize("num_tokens,head_dim,blocks", [
    (1, 16, {}), (7, 64, {}), (37, 16, {}),
    (70, 64, {}),  # 70 keys: two key blocks of 64, the second mostly masked
    (37, 16, {"block_m": 16, "block_n": 16}),  # three query blocks and three key blocks
    (7, 8, {}), (37, 24, {}), (9, 80, {}),  # head dims padded in the kernel: to 16, 32 and ViT-H's 80 to 128
])
def test_fp32_equals_the_formula(num_tokens, head_dim, blocks):
    """Within 1e-5 (measured <= 7.3e-7)."""
    q, k, v, size = packed_qkv(num_tokens, head_dim)
    scale = head_dim ** -0.5
    out = triton_proportional_attention(q, k, v, size, scale, **blocks)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), explicit(q, k, v, size, scale), rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_tokens,head_dim", [(7, 64), (70, 64)])
def test_fp16_within_rounding_of_the_formula(num_tokens, head_dim):
    """Against float64 on the same fp16 inputs: what remains is the rounding of the softmax weights before
    the second matmul and of the output (eps 2**-11 on outputs |x| < ~2), 2e-3 (measured <= 7.1e-4).
    Not bf16: the interpreter multiplies bf16's bit patterns in ``tl.dot`` (triton-lang/triton#11584)."""
    q, k, v, size = packed_qkv(num_tokens, head_dim, torch.float16)
    scale = head_dim ** -0.5
    out = triton_proportional_attention(q, k, v, size, scale)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), explicit(q, k, v, size, scale), rtol=0, atol=2e-3)


def test_keys_of_size_one_are_plain_attention():
    q, k, v, size = packed_qkv(37, 16)
    out = triton_proportional_attention(q, k, v, torch.ones_like(size), 16 ** -0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_strided_views_read_as_their_contiguous_copies():
    """Bit for bit, from timm's packed qkv and with q, k and v each in its own layout (read by its own strides)."""
    q, k, v, size = packed_qkv(70, 16, torch.float16)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = triton_proportional_attention(q, k, v, size, 0.25)
    assert torch.equal(out, triton_proportional_attention(q.contiguous(), k.contiguous(), v.contiguous(), size, 0.25))
    tokens_first = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(out, triton_proportional_attention(q.contiguous(), k, tokens_first, size, 0.25))


def test_output_memory_is_tokens_then_heads():
    q, k, v, size = packed_qkv(7, 16)
    out = triton_proportional_attention(q, k, v, size, 0.25)
    assert out.shape == (B, H, 7, 16)
    assert out.transpose(1, 2).is_contiguous()


def test_a_key_of_size_s_counts_as_s_identical_keys():
    """Keys of sizes 1-3 with their log-size bias against the same keys repeated size times with none;
    the repeated run has more tokens, so more queries, of which the first ``N`` are the same."""
    num_tokens, head_dim = 20, 16
    q, k, v, _ = packed_qkv(num_tokens, head_dim, seed=1)
    sizes = torch.randint(1, 4, (num_tokens,), generator=torch.Generator().manual_seed(2))
    total = int(sizes.sum())
    assert total > num_tokens  # some key holds more than one token
    out = triton_proportional_attention(q, k, v, sizes.float().expand(B, num_tokens), 0.25)

    extra_queries = torch.randn(B, H, total - num_tokens, head_dim, generator=torch.Generator().manual_seed(3))
    q_rep = torch.cat([q, extra_queries], dim=2)
    k_rep, v_rep = (t.repeat_interleave(sizes, dim=2) for t in (k, v))
    out_rep = triton_proportional_attention(q_rep, k_rep, v_rep, torch.ones(B, total), 0.25)
    torch.testing.assert_close(out, out_rep[:, :, :num_tokens], rtol=0, atol=1e-5)


def test_the_library_stands_the_kernels_against_the_mask_with_and_without_a_gradient(monkeypatch):
    """``proportional_attention`` in half precision goes through the kernels' FastestPaths (PyTorch's mask on
    the CPU, bit for bit the mask it always used): the forward kernel without a gradient, the trainable one
    with it where it has timm's packed qkv to write the gradient into. Each agrees with the mask by its path's
    own check (the trainable one through its backward), and a choice on a CPU stand-in path runs it. fp32 (no tensor cores for the kernels) stays on the mask."""
    from tome_train.tome import attention
    from tome_train.tome.kernels import FastestPath
    from tome_train.tome.triton_attention import size_biased_attention, size_biased_attention_trainable

    qkv, sizes = packed(37, 16, torch.float16, seed=3)
    q, k, v = packed_heads(qkv, H)
    size = sizes[..., None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention.size_bias(size).half())
    with torch.no_grad():
        assert torch.equal(attention.proportional_attention(q, k, v, size), expected)
    for path, kernel in ((attention._size_biased_attention, size_biased_attention),
                         (attention._trained_size_biased_attention, size_biased_attention_trainable)):
        assert path._load() is kernel and path.agree is attention.same_attention
    assert attention._trained_size_biased_attention.differentiable

    args = (q, k, v, sizes)
    assert attention.same_attention(args, attention._masked_attention(*args), size_biased_attention(*args))
    dropped = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # the check allows rounding, not this
    assert not attention.same_attention(args, attention._masked_attention(*args), dropped)
    full = tuple(t.float() for t in args)
    assert attention.same_attention(full, attention._masked_attention(*full), size_biased_attention(*full))
    assert not attention.same_attention(full, attention._masked_attention(*full), size_biased_attention(*full) + 1e-4)

    on_cpu = FastestPath(attention._masked_attention, size_biased_attention, device_types=("cpu",),
                         agree=attention.same_attention)
    trained_on_cpu = FastestPath(attention._packed_masked_attention, size_biased_attention_trainable,
                                 device_types=("cpu",), agree=attention.same_attention, differentiable=True)
    monkeypatch.setattr(attention, "_size_biased_attention", on_cpu)
    monkeypatch.setattr(attention, "_trained_size_biased_attention", trained_on_cpu)
    with torch.no_grad():
        attention.proportional_attention(*full[:3], size)  # fp32: the mask, the paths are not asked
        assert on_cpu.choices == {}
        torch.testing.assert_close(attention.proportional_attention(q, k, v, size), expected, rtol=0, atol=5e-3)
    assert len(on_cpu.choices) == 1 and trained_on_cpu.choices == {}
    qkv.requires_grad_()
    q, k, v = packed_heads(qkv, H)
    attention.proportional_attention(q, k, v, size)  # without the packed qkv: the mask, the path is not asked
    assert trained_on_cpu.choices == {}
    out = attention.proportional_attention(q, k, v, size, qkv=qkv)
    assert len(trained_on_cpu.choices) == 1 and not trained_on_cpu.broken  # agreed, output and gradients
    assert len(on_cpu.choices) == 1
    out.float().sum().backward()
    reference = qkv.detach().clone().requires_grad_()
    attention._packed_masked_attention(reference, H, sizes).float().sum().backward()
    torch.testing.assert_close(qkv.grad, reference.grad, rtol=5e-3, atol=5e-3)


def gradients(attend, qkv, size, grad_out, **kwargs):
    """``dq, dk, dv`` of ``attend(qkv, H, size, **kwargs)`` against ``grad_out``: the gradient of a (detached) leaf
    ``qkv``, split into heads as ``q, k, v`` are."""
    qkv = qkv.detach().requires_grad_()
    attend(qkv, H, size, **kwargs).backward(grad_out)
    return packed_heads(qkv.grad, H)


def explicit_packed(qkv, heads, size, scale):
    return explicit(*packed_heads(qkv, heads), size, scale)


def expected_gradients(qkv, size, grad_out, scale):
    """The gradients of :func:`explicit` in float64 on the same (rounded) inputs, ``log(size)`` rounded to
    ``qkv``'s dtype."""
    log_size_in_dtype = size.log().to(qkv.dtype).double().exp()
    return gradients(explicit_packed, qkv.double(), log_size_in_dtype, grad_out.double(), scale=scale)


def random_grad(out, seed=5):
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)


def output_like(qkv):
    """A tensor shaped like the attention output ``[B, H, N, D]`` of ``qkv``."""
    return packed_heads(qkv, H)[0]


@pytest.mark.parametrize("num_tokens,head_dim,blocks", [
    *((n, d, {}) for n in (1, 7, 37, 70) for d in (16, 64)),  # 70: two blocks of 64 keys, 3 steps of 32 rows
    # several blocks in every kernel, with outer and inner sizes unlike (a swap of the two is caught)
    (37, 16, {"block_m": 16, "block_n": 32, "block_outer": 32, "block_inner": 16}),
    (37, 24, {}), (9, 80, {}),  # head dims padded in the kernels to 32 and 128
    # padded head dims across blocks: a store that writes the padding spills into a row written before it
    (37, 24, {"block_m": 16, "block_n": 16, "block_outer": 16, "block_inner": 16}),
])
def test_fp32_gradients_equal_the_formula(num_tokens, head_dim, blocks):
    """dq, dk and dv, written where q, k and v lie in the packed gradient, within 1e-5 of float64 autograd
    (measured <= 1.4e-6 on gradients up to 3.4)."""
    qkv, size = packed(num_tokens, head_dim)
    grad_out, scale = random_grad(output_like(qkv)), head_dim ** -0.5
    grads = gradients(triton_proportional_attention_trainable, qkv, size, grad_out, scale=scale, **blocks)
    for grad, expected in zip(grads, expected_gradients(qkv, size, grad_out, scale)):
        assert grad.shape == (B, H, num_tokens, head_dim) and grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_tokens,head_dim", [(7, 64), (70, 64)])
def test_fp16_gradients_within_rounding_of_the_formula(num_tokens, head_dim):
    """Against float64 autograd on the same fp16 inputs: the kernels round the weights and ``dS`` to fp16 before
    their dots and the gradients (up to 2.5 here, ulp 2**-9) to fp16 at the end, 4e-3 (measured <= 9e-4).
    Not bf16: the interpreter multiplies bf16's bit patterns in ``tl.dot`` (triton-lang/triton#11584)."""
    qkv, size = packed(num_tokens, head_dim, torch.float16)
    grad_out = random_grad(output_like(qkv))
    grads = gradients(size_biased_attention_trainable, qkv, size, grad_out)
    for grad, expected in zip(grads, expected_gradients(qkv, size, grad_out, head_dim ** -0.5)):
        assert grad.dtype == torch.float16
        torch.testing.assert_close(grad.double(), expected, rtol=0, atol=4e-3)


def test_the_packed_gradient_is_autograds_through_the_split_heads():
    """Bit for bit: the packed gradient the kernels write is what autograd gives through timm's split of the
    heads from the same kernels' ``dq, dk, dv`` (stacked and copied into qkv's layout); the incoming gradient
    in the output's own layout (tokens then heads) or expanded from a sum (stride 0) is read by its strides."""
    from tome_train.tome.triton_attention import _fitted_blocks, triton_proportional_attention_backward

    qkv, size = packed(70, 16, torch.float16)
    grad_out = random_grad(output_like(qkv))
    q, k, v = packed_heads(qkv, H)
    out, lse = size_biased_attention_forward(qkv, H, size)
    blocks = _fitted_blocks(70)
    split = triton_proportional_attention_backward(q, k, v, size, out, lse, grad_out, 0.25,
                                            block_outer=blocks["block_outer"], block_inner=blocks["block_inner"])
    expected = torch.stack(split).permute(1, 3, 0, 2, 4).reshape(qkv.shape)
    tokens_first = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    for incoming in (grad_out, tokens_first):
        leaf = qkv.detach().requires_grad_()
        size_biased_attention_trainable(leaf, H, size).backward(incoming)
        assert torch.equal(leaf.grad, expected)

    leaf = qkv.detach().requires_grad_()
    size_biased_attention_trainable(leaf, H, size).sum().backward()
    ones = gradients(size_biased_attention_trainable, qkv, size, torch.ones_like(grad_out))
    assert all(torch.equal(a, b) for a, b in zip(packed_heads(leaf.grad, H), ones))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trainable_forward_is_the_inference_kernel(dtype):
    """Bit for bit: the same kernel, only keeping its log-sum-exp, which is the base-2 log of the softmax's
    denominator (within 1e-5 of float64, measured <= 7.6e-7)."""
    qkv, size = packed(70, 16, dtype)
    q, k, v = packed_heads(qkv, H)
    out = size_biased_attention_trainable(qkv.requires_grad_(), H, size)
    assert out.requires_grad and out.stride() == size_biased_attention(q, k, v, size).stride()
    assert torch.equal(out, size_biased_attention(q, k, v, size))
    _, lse = size_biased_attention_forward(qkv.detach(), H, size)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.25 + size.log().to(dtype).double()[:, None, None, :]
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1) / torch.log(torch.tensor(2.0)), rtol=0,
                               atol=1e-5)


def test_size_gets_no_gradient_and_no_second_derivative():
    """Sizes are detached in ToMe: the backward returns None for them even when they ask for a gradient.
    A second derivative raises instead of being silently wrong."""
    qkv, size = (t.detach().requires_grad_() for t in packed(7, 16))
    out = size_biased_attention_trainable(qkv, H, size)
    out.backward(random_grad(out))
    assert size.grad is None and qkv.grad is not None

    grad_out = random_grad(out).requires_grad_()  # a double-backward pass differentiates in the gradient too
    (dqkv,) = torch.autograd.grad(size_biased_attention_trainable(qkv, H, size), qkv, grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dqkv.sum().backward()


@pytest.fixture
def kernels_chosen_to_train(monkeypatch):
    """The training kernels' path standing in on the CPU and timed as the faster, so that it takes the kernels."""
    from tome_train.tome import attention
    from tome_train.tome import kernels
    from tome_train.tome.kernels import FastestPath

    path = FastestPath(attention._packed_masked_attention, size_biased_attention_trainable, device_types=("cpu",),
                       agree=attention.same_attention, differentiable=True)
    monkeypatch.setattr(attention, "_trained_size_biased_attention", path)
    monkeypatch.setattr(kernels, "seconds_per_call",
        lambda fn, device, args: 0.0 if fn.__wrapped__ is size_biased_attention_trainable else 1.0)
    return path


def half_precision_vit():
    """ViT-Ti (2 blocks at 64 px: 17 tokens, r 2) in fp16, and three images."""
    import timm

    from tome_train.tome import apply_tome

    torch.manual_seed(0)
    model = apply_tome(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10), 2).half()
    return model, torch.randn(3, 3, 64, 64).half()


def test_a_half_precision_model_trains_through_the_kernels_as_through_the_mask(kernels_chosen_to_train):
    """ViT-Ti (2 blocks at 64 px: 17 tokens, r 2) in fp16 with the training kernels standing in on the CPU (timed
    as the faster): every block after the first takes them with its packed qkv, and every parameter's gradient
    is the mask's to fp16 rounding (a gradient in the wrong place of qkv, or none, is off by its whole size)."""
    from tome_train.tome.kernels import pytorch_ops_only

    path = kernels_chosen_to_train
    model, images = half_precision_vit()

    def grads():
        model.zero_grad()
        model(images).float().square().sum().backward()
        return [p.grad.float().clone() for p in model.parameters()]

    with pytorch_ops_only():
        expected = grads()
    got = grads()
    assert list(path.choices.values()) == [size_biased_attention_trainable]  # the second block, with sizes
    for (name, _), grad, expected_grad in zip(model.named_parameters(), got, expected):
        scale = expected_grad.abs().max().clamp_min(1e-3)
        assert (grad - expected_grad).abs().max() <= 2e-2 * scale, name


def test_a_compiled_half_precision_model_trains_through_the_kernels_as_eager(kernels_chosen_to_train):
    """The same ViT-Ti step under ``torch.compile`` (AOTAutograd, the graph run as traced): attention reaches the
    graph as the op pair, the choice is made inside its first call (through the backward), and logits and every
    parameter's gradient are the eager step's through the same kernels."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    path = kernels_chosen_to_train
    model, images = half_precision_vit()

    def step(forward):
        model.zero_grad()
        logits = forward(images)
        logits.float().square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    expected = step(model)
    path.choices.clear()
    ops = []

    def backend(graph_module, example_inputs):
        ops.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    logits, grads = step(torch.compile(model, backend=aot_autograd(fw_compiler=backend, bw_compiler=backend)))
    assert torch.ops.tome_train.trained_size_biased_attention.default in ops
    assert torch.ops.tome_train.trained_size_biased_attention_backward.default in ops
    assert list(path.choices.values()) == [size_biased_attention_trainable]  # chosen inside the compiled graph
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=0)
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected[1]):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-3, msg=name)
