"""torch.compile(fullgraph=True) on a HiDiffusion-patched tiny SD1.5 UNet, driven step by step with denoising_step.

What compiles: the UNet's forward, with every window-attention processor, RAU-Net hook and forward override
inside it, as one graph per set of active RAU-Net ops. The step and the window phases are decided eagerly
outside the compiled forward (the patched UNet's __call__) and reach it as state that dynamo guards on: a
RAU-Net phase switch recompiles once, the steps in between reuse the graph, and random window phases enter
as a tensor (one graph for every draw, nothing for CUDA graphs to re-record).
"""
import contextlib
import logging
import re

import diffusers
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0
from torch._dynamo.symbolic_convert import graph_break_log
from torch._dynamo.utils import counters

import hidiff_models
from hidiff_models import apply_hidiffusion, denoising_step
from hidiff_models.configs import POOLED_TEXT_DIM, build_unet
from hidiff_models.schedule import active_ops

from conftest import relative_error, requires_interpreter

NUM_STEPS = 10
STEPS = range(2, 6)  # steps 0-3 run RAD-conv (T1 = int(0.4 * 10)), steps 4-5 run no RAU-Net op
LATENT = (16, 16)


@pytest.fixture(scope="module")
def unet():
    unet = build_unet("sd15", "tiny", seed=1)
    return apply_hidiffusion(unet, backend="torch", window_shift=1)


class CountingBackend:
    """A torch.compile backend that runs each captured graph eagerly and keeps it (inductor adds only time)."""

    def __init__(self):
        self.graphs = []
        self.inputs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        self.inputs.append(example_inputs)
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def inputs(batch=1):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, *LATENT, generator=gen),
            dict(encoder_hidden_states=torch.randn(batch, 7, 32, generator=gen)))


@torch.no_grad()
def run(model, unet, step, batch=1):
    sample, kwargs = inputs(batch)
    with denoising_step(unet, step, NUM_STEPS):
        return model(sample, 500, **kwargs).sample


class GraphBreaks(logging.Handler):
    """The 'file:line' of every graph break dynamo logs (the innermost user frame where tracing stopped)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.locations = []

    def emit(self, record):
        found = re.search(r"in user code at (\S+):(\d+)", record.getMessage())
        if found:
            self.locations.append(f"{found[1]}:{found[2]}")


@contextlib.contextmanager
def recorded_graph_breaks():
    breaks = GraphBreaks()
    torch._logging.set_logs(graph_breaks=True)
    graph_break_log.addHandler(breaks)
    try:
        yield breaks
    finally:
        graph_break_log.removeHandler(breaks)
        torch._logging.set_logs()


def test_compiled_unet_matches_eager_and_recompiles_once_per_phase(unet):
    backend = CountingBackend()
    compiled = torch.compile(unet, backend=backend, fullgraph=True)
    with recorded_graph_breaks() as breaks:
        for step in STEPS:
            expected = run(unet, unet, step)
            assert relative_error(run(compiled, unet, step), expected) < 1e-5, step
    assert not breaks.locations and not sum(counters["graph_break"].values())

    phases = {active_ops("sd15", *LATENT, step, NUM_STEPS) for step in STEPS}
    assert len(phases) == 2  # the run does cross a RAU-Net phase switch
    # One graph per phase: nothing inside the forward (our processors, hooks, overrides, reference ops) breaks
    # it up, and steps of the same phase reuse the compiled graph instead of recompiling.
    graphs = backend.graphs
    assert len(graphs) == len(phases), [len(g.graph.nodes) for g in graphs]

    # The hidiff code traced into the graphs: MSW-MSA (tokens gathered in window order) in both, RAD-conv
    # (a stride-4 conv) in the first phase's graph only.
    rad_conv = [bool(re.search(r"conv2d\(.*stride = 4", g.code)) for g in graphs]
    assert rad_conv == [True, False]
    assert all("index_select" in g.code for g in graphs)


def test_random_window_phases_do_not_recompile_per_draw():
    # Two copies with the same seed draw the same phases call after call: one compiled, one eager.
    eager = apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend="torch", generator=3)
    traced = apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend="torch", generator=3)
    backend = CountingBackend()
    compiled = torch.compile(traced, backend=backend, fullgraph=True)
    calls = 4
    for _ in range(calls):
        expected = run(eager, eager, NUM_STEPS - 1)  # a late step: no RAU-Net op, MSW-MSA only
        assert relative_error(run(compiled, traced, NUM_STEPS - 1), expected) < 1e-5
    # The phases the 5 windowed blocks drew in those calls (the adapter's generator, seeded 3): they vary.
    gen = torch.Generator().manual_seed(3)
    draws = {tuple(torch.randint(4, (5,), generator=gen).tolist()) for _ in range(calls)}
    assert len(draws) == calls
    # One graph serves every draw (5 blocks x 4 phases would otherwise be a graph per call), and the phases are
    # not symbolic ints (CUDA graph trees record a graph per distinct int) but the values of int64 inputs, one
    # per block.
    assert len(backend.graphs) == 1, len(backend.graphs)
    assert "index_select" in backend.graphs[-1].code
    inputs = backend.inputs[-1]
    assert not [x for x in inputs if isinstance(x, (int, torch.SymInt))]
    assert [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor) and x.dtype == torch.int64] == [()] * 5


@pytest.mark.parametrize("window_shift", [None, 1])
def test_regional_compilation_shares_graphs_across_window_blocks(window_shift):
    # compile_repeated_blocks compiles BasicTransformerBlock.forward once for all its instances: SDXL's 10 window
    # blocks must not each need their own graph (past dynamo's recompile limit of 8, fullgraph=True fails).
    if not hasattr(UNet2DConditionModel, "compile_repeated_blocks"):
        pytest.skip(f"diffusers {diffusers.__version__} has no regional compilation (compile_repeated_blocks)")
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=gen)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 7, 32, generator=gen), added_cond_kwargs=dict(
        text_embeds=torch.randn(1, POOLED_TEXT_DIM["tiny"], generator=gen), time_ids=torch.randn(1, 6, generator=gen)))
    eager, traced = (apply_hidiffusion(build_unet("sdxl", "tiny", seed=1), backend="torch", generator=3,
                                       window_shift=window_shift) for _ in "ab")
    backend = CountingBackend()
    traced.compile_repeated_blocks(backend=backend, fullgraph=True)
    steps = (0, 1, NUM_STEPS - 1)  # RAU-Net phases: RAD-conv, RAD-conv, none
    for step in steps:
        with torch.no_grad(), denoising_step(eager, step, NUM_STEPS), denoising_step(traced, step, NUM_STEPS):
            expected = eager(sample, 500, **kwargs).sample
            assert relative_error(traced(sample, 500, **kwargs).sample, expected) < 1e-5, step
    # The graphs dynamo tells apart by the blocks' shapes and processors: as many with drawn phases as pinned.
    assert len(backend.graphs) == 3


def test_pag_composition_compiles_once():
    # A PAG pipeline sets its processor on some window blocks for its call; each UNet call composes it with
    # MSW-MSA (test_adapter's PAG test) inside the graph, which the steps reuse.
    unets = [apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend="torch", window_shift=1) for _ in "ab"]
    for unet in unets:
        pag = PAGCFGIdentitySelfAttnProcessor2_0()
        for attn, _ in unet._hidiffusion.window_sites[2:]:  # up_blocks.3
            attn.processor = pag
    eager, traced = unets
    backend = CountingBackend()
    compiled = torch.compile(traced, backend=backend, fullgraph=True)
    with recorded_graph_breaks() as breaks:
        for step in range(NUM_STEPS - 3, NUM_STEPS):  # one RAU-Net phase: none active
            expected = run(eager, eager, step, batch=3)
            assert relative_error(run(compiled, traced, step, batch=3), expected) < 1e-5, step
    assert not breaks.locations and len(backend.graphs) == 1


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_interpreter)])
def test_layer_skip_of_attention_scores_under_compile(backend):
    # The PAG and skip-layer guiders of modular pipelines hook a block's attention for some UNet calls, and the
    # hook's function mode replaces the scores inside SDPA. The adapter reads the hooks before each call, so the
    # compiled forward guards on them: a hooked window block takes the torch path (SDPA) on either backend.
    layer_skip = pytest.importorskip("diffusers.hooks.layer_skip")
    config = layer_skip.LayerSkipConfig(indices=[0], fqn="transformer_blocks", skip_attention=False,
                                        skip_attention_scores=True, skip_ff=False)
    eager, traced = (apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend=backend, window_shift=1)
                     for _ in "ab")
    compiled = torch.compile(traced, backend=CountingBackend(), fullgraph=True)
    step = NUM_STEPS - 1
    plain = run(eager, eager, step)
    for unet in (eager, traced):
        layer_skip.apply_layer_skip(unet.up_blocks[3].attentions[0], config)
    skipped = run(eager, eager, step)
    assert relative_error(skipped, plain) > 1e-2
    with recorded_graph_breaks() as breaks:
        assert relative_error(run(compiled, traced, step), skipped) < 1e-5
        hooked = traced.up_blocks[3].attentions[0].transformer_blocks[0].attn1
        hooked._diffusers_hook.remove_hook(layer_skip._LAYER_SKIP_HOOK)
        assert relative_error(run(compiled, traced, step), plain) < 1e-5
    assert not breaks.locations


def test_reapply_and_remove_after_compile_and_no_apply_after_compile():
    unet = apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend="torch", window_shift=1)
    vanilla = build_unet("sd15", "tiny", seed=1)
    compiled = torch.compile(unet, backend=CountingBackend(), fullgraph=True)
    run(compiled, compiled, 0)  # denoising_step takes the compiled UNet too
    # compiled after apply: the compiled call is the patched one, so applying again (other settings) is fine
    apply_hidiffusion(compiled, backend="torch", window_shift=2)
    eager = apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend="torch", window_shift=2)
    patched = run(compiled, compiled, 0)
    assert relative_error(patched, run(eager, eager, 0)) < 1e-5
    hidiff_models.remove_hidiffusion(compiled)
    sample, kwargs = inputs()
    with torch.no_grad():
        expected = vanilla(sample, 500, **kwargs).sample
        assert torch.equal(compiled(sample, 500, **kwargs).sample, expected)  # the graph saw the removal
    assert not torch.equal(patched, expected)
    with pytest.raises(TypeError, match="apply HiDiffusion first, then compile"):
        apply_hidiffusion(compiled, backend="torch")  # removed since: refused as any compiled UNet not patched


def test_in_place_compile_after_apply_and_not_before():
    unet = apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend="torch", window_shift=1)
    eager = apply_hidiffusion(build_unet("sd15", "tiny", seed=1), backend="torch", window_shift=1)
    backend = CountingBackend()
    unet.compile(backend=backend, fullgraph=True)
    with recorded_graph_breaks() as breaks:
        for step in (0, NUM_STEPS - 1):  # RAU-Net active, then not
            assert relative_error(run(unet, unet, step), run(eager, eager, step)) < 1e-5, step
    assert not breaks.locations and len(backend.graphs) == 2
    apply_hidiffusion(unet, backend="torch", window_shift=1)  # re-applying to it is fine: it binds the patched call
    assert relative_error(run(unet, unet, 0), run(eager, eager, 0)) < 1e-5

    compiled_first = build_unet("sd15", "tiny", seed=1)
    compiled_first.compile(backend=CountingBackend())
    with pytest.raises(TypeError, match=r"unet.compile\(\)\): apply HiDiffusion first"):
        apply_hidiffusion(compiled_first, backend="torch")
    assert "_call_impl" not in compiled_first.__dict__
