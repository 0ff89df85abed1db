"""The ``torch.compile`` modes a patched model takes, named without importing torch: a config naming one is checked,
and a bad one refused, in a fraction of a second."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay the compiled graphs as CUDA graphs
