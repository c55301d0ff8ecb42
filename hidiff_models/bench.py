"""``hidiff bench``: a UNet denoising step with and without HiDiffusion, and each fused op against its
baselines, timed side by side in one run.

UNet rows: one UNet call with a classifier-free-guidance batch of 2 at an early step (RAU-Net and
MSW-MSA active) and a late step (MSW-MSA only): vanilla, ``backend="torch"`` (plain PyTorch: the reference
convs and the window-gather MSW-MSA) and ``backend="triton"`` (CUDA only). Op rows, at the shapes the op has
in that UNet:

- msw: the whole ``attn1`` of the first MSW-MSA block: the original roll/partition path (the baseline),
  global attention (no windows, what the UNet runs without HiDiffusion), and the hidiff op;
- rad-conv: ``F.conv2d(stride=4, padding=2, dilation=2)`` against ``rau_downsample_conv``;
- upsample-conv: ``F.interpolate`` (nearest) + ``F.conv2d`` against ``upsample_conv``, at the x4 upsample
  that follows RAD-conv.

On CPU the hidiff op rows run the torch backend (``hidiff_kernels.reference`` for the convs, the window
gather for msw) and the Triton rows are not timed: the Triton interpreter's timings say nothing about kernel
performance. Timings are medians after one warm-up call (CUDA events on CUDA); peak memory is CUDA's peak
allocation above what was allocated before the timed calls, n/a on CPU. ``rel_err`` is max|out - ref| /
max|ref| against the row's reference: the torch backend for the Triton UNet rows (same seed, so the same
window shifts), the original path or plain PyTorch composition for the op rows.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import hidiff_kernels
from hidiff_kernels.benchmarking import rel_err, timed_call_ms

from .adapter import detected_model_type
from .cli import UserError, first_line, hf_cache_hint
from .configs import build_unet
from .schedule import active_ops

BATCH = 2  # classifier-free guidance: the conditional and unconditional latents in one UNet call
TRITON_ON_CPU = "n/a (needs CUDA; interpreter timings are not kernel performance)"
CPU_LABEL = "CPU reference timings, not kernel performance"
DEFAULT_JSON = "bench-results/bench.json"
# Image sizes in pixels (latents are 1/8). CUDA: the resolutions HiDiffusion is for. CPU: small enough for
# the default run (tiny UNets) to take well under 2 minutes on 2 cores.
# sd21: 2x and 4x its 768 px; sdxl_turbo: 2x and 4x its 512 px (HiDiffusion's Turbo profile is for 1024 px)
CUDA_SIZES = {"sd15": (1024, 2048), "sd21": (1536, 3072), "sdxl": (2048, 4096), "sdxl_turbo": (1024, 2048)}
CPU_SIZES = {"sd15": (512,), "sd21": (512,), "sdxl": (512,), "sdxl_turbo": (512,)}
# The UNet family and apply_hidiffusion's model_type of each --model-type: SD2.1 is the SD1.5 family (same
# blocks, same schedule); SDXL-Turbo is SDXL's UNet (the built-in one too) with its own schedule.
FAMILY = {"sd15": "sd15", "sd21": "sd15", "sdxl": "sdxl", "sdxl_turbo": "sdxl"}
MODEL_TYPE = {"sd15": "sd15", "sd21": "sd15", "sdxl": "sdxl", "sdxl_turbo": "sdxl_turbo"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Where each op runs in the UNet. *_div: the map's size there is the latent size / div (each stride-2
# downsampler rounds up). The upsampler enlarges RAD-conv's output (1/4 of its input) back x4.
SITES = {
    "sd15": dict(attn="down_blocks.0.attentions.0.transformer_blocks.0.attn1", attn_div=1,
                 rad_conv="down_blocks.0.downsamplers.0.conv", rad_div=1,
                 upsampler="up_blocks.2.upsamplers.0.conv"),
    "sdxl": dict(attn="down_blocks.1.attentions.0.transformer_blocks.0.attn1", attn_div=2,
                 rad_conv="down_blocks.1.downsamplers.0.conv", rad_div=2,
                 upsampler="up_blocks.0.upsamplers.0.conv"),
}


@dataclass
class BenchConfig:
    models: list  # model types, e.g. ["sd15", "sdxl"]; with model_path: one entry (None: the folder's, detected)
    device: str = "cpu"
    dtype: str = "fp32"
    unet_size: str = "tiny"  # built-in UNets: "tiny" (narrow channels) or "full" (real architecture)
    model_path: str | None = None
    sizes: list | None = None  # image sizes [(h, w), ...] in pixels; None: per-model defaults
    num_steps: int = 50
    steps: list = field(default_factory=lambda: [0, 49])
    repeats: int = 3
    seed: int = 0
    kernels: bool = True
    threads: int | None = None
    # Tests only: run the Triton rows on CPU through the interpreter (TRITON_INTERPRET=1) to check the
    # code path; such timings mean nothing.
    triton_on_cpu: bool = False


@dataclass
class Row:
    model: str
    image: str  # "1024x1024"
    latent: str  # "128x128"
    group: str  # unet | msw | rad-conv | upsample-conv
    case: str
    median_ms: float | None = None
    times_ms: list = field(default_factory=list)
    speedup: float | None = None  # first timed row of the group / this row
    peak_mib: float | None = None
    rel_err: float | None = None
    note: str = ""


def default_config(device: str) -> dict:
    """The defaults that depend on the device: UNet size, dtype, repeats."""
    if device == "cuda":
        return dict(unet_size="full", dtype="fp16", repeats=5)
    return dict(unet_size="tiny", dtype="fp32", repeats=3)


def run(cfg: BenchConfig, checkpoint=None) -> dict:
    """Run every case of ``cfg``; returns {"meta": ..., "rows": [Row as dict]}.

    ``checkpoint(result)``, if given, gets the results so far (meta["partial"] True) after each model size.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    for s in cfg.steps:
        if not 0 <= s < cfg.num_steps:
            raise UserError(f"--steps-to-time: step {s} is outside 0..{cfg.num_steps - 1}")
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.threads))
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest conv per shape, as the Triton kernels autotune
    try:
        return _run(cfg, device, checkpoint)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def cpu_threads(requested=None) -> int:
    """Threads for the CPU run: ``requested``, else torch's default, or 1 when other processes already keep
    every core busy (OpenMP threads spin-wait for each other: on a loaded 2-core machine two threads ran a
    tiny UNet 10-20x slower than one)."""
    if requested:
        return requested
    default = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if default > 1 and load >= cores:
        print(f"machine busy (load {load:.1f} on {cores} cores): using 1 thread (--threads N to override)",
              file=sys.stderr)
        return 1
    return default


def _run(cfg, device, checkpoint):
    dtype = DTYPES[cfg.dtype]
    models = [m or local_model_type(cfg.model_path) for m in cfg.models]
    plan = [(m, size) for m in models for size in _sizes_for(cfg, m)]
    per_size = (1 + 2 * len(cfg.steps)) + (7 if cfg.kernels else 0)
    rows = []
    started = time.perf_counter()
    with quiet_diffusers(), torch.inference_mode(), Progress(len(plan) * per_size) as bar:
        loaded = unet = None
        for model, (h, w) in plan:
            if unet is None or model != loaded:
                unet = None  # one model in memory at a time
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                bar.set_description(f"loading {model}")
                unet = _load(cfg, model, dtype, device)
                loaded = model
            where = dict(model=model if cfg.model_path is None else f"{model} ({cfg.model_path})",
                         image=f"{h}x{w}", latent=f"{h // 8}x{w // 8}")
            rows += _unet_rows(cfg, unet, model, (h // 8, w // 8), device, dtype, where, bar)
            if cfg.kernels:
                rows += _op_rows(cfg, unet, model, (h // 8, w // 8), device, dtype, where, bar)
            if checkpoint is not None:
                checkpoint({"meta": dict(_meta(cfg, device, time.perf_counter() - started), partial=True),
                            "rows": [asdict(r) for r in rows]})
    meta = _meta(cfg, device, time.perf_counter() - started)
    return {"meta": meta, "rows": [asdict(r) for r in rows]}


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, pipes) one line per case, so a hang shows where it is."""

    def __init__(self, total):
        from tqdm import tqdm

        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, disable=not self.tty)

    def set_description(self, text):
        if self.tty:
            self.bar.set_description(text)
        else:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self):
        self.done += 1
        self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers logs only errors inside: it warns on every .to(dtype) of a model without fp32-only modules,
    and about downloads that offline mode refuses anyway."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _sizes_for(cfg, model):
    if cfg.sizes:
        return cfg.sizes
    table = CUDA_SIZES if cfg.device == "cuda" else CPU_SIZES
    return [(s, s) for s in table[model]]


# ---------------------------------------------------------------------------------------------- models


def _load(cfg, model, dtype, device):
    """The UNet of model type ``model``: a built-in one, or the local folder cfg.model_path's."""
    if cfg.model_path is None:
        architecture = "sdxl" if model == "sdxl_turbo" else model
        return build_unet(architecture, cfg.unet_size, seed=cfg.seed, dtype=dtype, device=device)
    return load_local_unet(cfg.model_path, dtype, device)


def missing_weights(folder: Path) -> str | None:
    """What keeps a diffusers model folder from holding weights (safetensors or .bin, sharded or not), or None."""
    files = [*folder.glob("diffusion_pytorch_model*.safetensors"), *folder.glob("diffusion_pytorch_model*.bin")]
    if any(f.is_file() for f in files):
        return None
    if files:  # a Hugging Face cache snapshot links its files to blobs, which may have been deleted
        return f"{files[0]} is a broken link (its target is missing)"
    return f"no UNet weights in {folder} (diffusion_pytorch_model*.safetensors or .bin)"


# diffusion_pytorch_model.fp16.safetensors, a shard diffusion_pytorch_model.fp16-00001-of-00002.safetensors,
# or a shard index diffusion_pytorch_model.safetensors.index.fp16.json
_VARIANT_FILE = re.compile(r"diffusion_pytorch_model\.(?:(\w+?)(?:-\d+-of-\d+)?\.(?:safetensors|bin)"
                           r"|(?:safetensors|bin)\.index\.(\w+)\.json)")


def weights_variant(folder: Path, dtype) -> str | None:
    """The weights variant from_pretrained must be told to load a diffusers model folder: None when it holds
    plain weights, else the variant its files are named with ("fp16" for diffusion_pytorch_model.fp16.safetensors,
    as a download with variant="fp16" leaves them), the one named after ``dtype`` if there are several."""
    plain = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
    if any((folder / name).is_file() for name in plain):
        return None
    variants = sorted({v for f in folder.iterdir() if (m := _VARIANT_FILE.fullmatch(f.name)) for v in m.groups() if v})
    preferred = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    return preferred if preferred in variants else next(iter(variants), None)


def unet_folder(path) -> Path:
    """The UNet folder of a local diffusers pipeline folder (its unet/) or UNet folder, after the cheap checks."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"--model {path}: no such file or folder")
    folder = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise UserError(f"--model {path}: not a diffusers folder (no unet/config.json or config.json)"
                        + hf_cache_hint(root))
    problem = missing_weights(folder)
    if problem:
        raise UserError(f"--model {path}: {problem}")
    return folder


def load_local_unet(path, dtype, device):
    """UNet2DConditionModel from a local diffusers pipeline folder or UNet folder; never downloads."""
    from diffusers import UNet2DConditionModel

    folder = unet_folder(path)
    try:
        with torch_dtype_quiet():
            unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                        variant=weights_variant(folder, dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"--model {path}: could not load the UNet: {first_line(e)}") from None
    return unet.to(device).eval()


@contextlib.contextmanager
def torch_dtype_quiet():
    """Newer diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (with a warning); older ones
    take only ``torch_dtype``: pass that, without the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        yield


def local_model_type(path) -> str:
    """The model type of a local diffusers folder's UNet from its config alone, before the weights load: as
    apply_hidiffusion detects it (SDXL-Turbo by "turbo" in the checkpoint folder's name); an unsupported UNet is
    refused."""
    config = json.loads((unet_folder(path) / "config.json").read_text())
    try:  # the absolute path: the checkpoint's name (SDXL-Turbo) is its folder's, even for "."
        return detected_model_type(config, os.path.abspath(path))
    except ValueError as e:
        raise UserError(f"--model {path}: {e}") from None


def unet_inputs(unet, latent_hw, device, dtype, seed=0):
    """Keyword arguments of one UNet call: CFG batch of 2, 77 text tokens, SDXL's pooled text and time ids."""
    gen = torch.Generator().manual_seed(seed)
    config = unet.config

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    kwargs = dict(sample=randn(BATCH, config.in_channels, *latent_hw), timestep=torch.tensor(500, device=device),
                  encoder_hidden_states=randn(BATCH, 77, config.cross_attention_dim))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        h, w = latent_hw[0] * 8, latent_hw[1] * 8
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * BATCH, device=device, dtype=dtype)
        kwargs["added_cond_kwargs"] = dict(text_embeds=randn(BATCH, pooled), time_ids=time_ids)
    return kwargs


# ---------------------------------------------------------------------------------------------- timing


def time_call(fn, repeats, device):
    """One warm-up call (compiles and auto-tunes Triton kernels), then ``repeats`` timed calls.

    Returns (median ms, [ms], peak MiB above the memory allocated before the timed calls or None on CPU,
    the warm-up call's output).
    """
    cuda = device.type == "cuda"
    first = fn()
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed_call_ms(fn, device) for _ in range(repeats)]
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return statistics.median(times), times, peak, first


def _timed_row(where, group, case, fn, repeats, device, ref=None, note=""):
    median, times, peak, out = time_call(fn, repeats, device)
    err = rel_err(out, ref) if ref is not None else None
    row = Row(**where, group=group, case=case, median_ms=median, times_ms=times, peak_mib=peak, rel_err=err, note=note)
    return row, out


def _set_speedups(rows):
    base = next((r.median_ms for r in rows if r.median_ms), None)
    for r in rows:
        if base and r.median_ms:
            r.speedup = base / r.median_ms
    return rows


# ---------------------------------------------------------------------------------------------- UNet rows


def _unet_rows(cfg, unet, model, latent_hw, device, dtype, where, bar):
    from . import apply_hidiffusion, denoising_step, remove_hidiffusion

    inputs = unet_inputs(unet, latent_hw, device, dtype, cfg.seed)
    n = cfg.num_steps

    def call():
        return unet(**inputs).sample

    bar.set_description(f"{where['model']} {where['image']}: vanilla")
    row, _ = _timed_row(where, "unet", "vanilla (no HiDiffusion)", call, cfg.repeats, device)
    rows = [row]
    bar.update()
    torch_out = {}
    for backend in ("torch", "triton"):
        if backend == "triton" and not _triton_rows(cfg, device):
            for step in cfg.steps:
                rows.append(Row(**where, group="unet", case=f"hidiff triton, step {step}/{n}", note=TRITON_ON_CPU))
                bar.update()
            continue
        # The same seed for both backends and the same sequence of calls: the same window shifts.
        apply_hidiffusion(unet, backend=backend, generator=cfg.seed, model_type=MODEL_TYPE[model])
        try:
            for step in cfg.steps:
                bar.set_description(f"{where['model']} {where['image']}: {backend} step {step}")

                def step_call(step=step):
                    with denoising_step(unet, step, n):
                        return call()

                row, out = _timed_row(where, "unet", f"hidiff {backend}, step {step}/{n}", step_call, cfg.repeats,
                                      device, ref=torch_out.get(step), note=_step_note(model, latent_hw, step, n))
                if backend == "torch":
                    torch_out[step] = out
                rows.append(row)
                bar.update()
        finally:
            remove_hidiffusion(unet)
    return _set_speedups(rows)


def _triton_rows(cfg, device):
    return device.type == "cuda" or (cfg.triton_on_cpu and hidiff_kernels.interpreter_enabled())


def _step_note(model, latent_hw, step, n):
    """What the step runs, by the schedule apply_hidiffusion follows for this UNet called by hand."""
    ops = active_ops(MODEL_TYPE[model], *latent_hw, step, n)
    return "RAU-Net + MSW-MSA" if ops.rad_conv or ops.rad_pool else "MSW-MSA only"


# ---------------------------------------------------------------------------------------------- op rows


def _map_size(latent_hw, div):
    """Size of the map after log2(div) stride-2 downsamplers (each rounds up)."""
    h, w = latent_hw
    while div > 1:
        h, w, div = -(-h // 2), -(-w // 2), div // 2
    return h, w


def _op_rows(cfg, unet, model, latent_hw, device, dtype, where, bar):
    from hidiff_kernels import reference

    from .processors import shift_for_phase, window_attention

    fused = _triton_rows(cfg, device)
    ops = hidiff_kernels if fused else reference  # on CPU the reference op, or the interpreter for triton_on_cpu
    ours = "hidiff fused Triton kernel" if fused else "hidiff reference op (CPU)"
    site = SITES[FAMILY[model]]
    modules = dict(unet.named_modules())
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def timed(group, case, fn, ref=None, note=""):
        bar.set_description(f"{where['model']} {where['image']}: {group} {case.split(' (')[0]}")
        row, out = _timed_row(where, group, case, fn, cfg.repeats, device, ref=ref, note=note)
        bar.update()
        return row, out

    rows = []
    # MSW-MSA: the first window block's attn1 on its real token map, window phase 1 (a wrapping shift).
    attn = modules[site["attn"]]
    hw = _map_size(latent_hw, site["attn_div"])
    shift = shift_for_phase(*hw, 1)
    x = randn(BATCH, hw[0] * hw[1], attn.to_q.in_features)
    group = []
    if hw[0] % 2 == 0 and hw[1] % 2 == 0:
        base_row, base = timed("msw", "original roll/partition + attn1",
                               lambda: original_window_attn(attn, x, hw, shift))
    else:  # the original resizes odd maps (bicubic), a different function
        base_row, base = Row(**where, group="msw", case="original roll/partition + attn1",
                             note="odd map: the original resizes it; not timed"), None
        bar.update()
    group.append(base_row)
    group.append(timed("msw", "global attn1 (no windows)", lambda: attn(x))[0])
    msw_case = "hidiff fused Triton kernel: msw_attention" if fused else "hidiff torch backend (CPU): window gather"
    group.append(timed("msw", msw_case, lambda: window_attention(attn, x, hw, shift, fused), ref=base)[0])
    rows += _set_speedups(group)

    # RAD-conv: the downsampler conv with stride 4.
    conv = modules[site["rad_conv"]]
    h, w = _map_size(latent_hw, site["rad_div"])
    x = randn(BATCH, conv.in_channels, h, w)
    base_row, base = timed("rad-conv", "F.conv2d stride 4 dil 2",
                           lambda: F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2))
    ours_row, _ = timed("rad-conv", f"{ours}: rau_downsample_conv",
                        lambda: ops.rau_downsample_conv(x, conv.weight, conv.bias), ref=base)
    rows += _set_speedups([base_row, ours_row])

    # RAU-upsample: the matching upsampler enlarges RAD-conv's output x4, back to the skip size.
    up = modules[site["upsampler"]]
    small = (-(-h // 4), -(-w // 4))
    x = randn(BATCH, up.in_channels, *small)
    base_row, base = timed("upsample-conv", "F.interpolate x4 + F.conv2d",
                           lambda: F.conv2d(F.interpolate(x, size=(h, w), mode="nearest"), up.weight, up.bias,
                                            padding=1))
    ours_row, _ = timed("upsample-conv", f"{ours}: upsample_conv",
                        lambda: ops.upsample_conv(x, up.weight, up.bias, size=(h, w)), ref=base)
    rows += _set_speedups([base_row, ours_row])
    return rows


def original_window_attn(attn, x, hw, shift):
    """The original HiDiffusion MSW-MSA: roll the tokens, cut 4 windows into the batch, attn1, merge, roll back."""
    (H, W), (sh, sw) = hw, shift
    B, N, C = x.shape
    rolled = torch.roll(x.view(B, H, W, C), (-sh, -sw), dims=(1, 2))
    windows = rolled.view(B, 2, H // 2, 2, W // 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B * 4, N // 4, C)
    out = attn(windows).view(B, 2, 2, H // 2, W // 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    return torch.roll(out, (sh, sw), dims=(1, 2)).reshape(B, N, C)


# ---------------------------------------------------------------------------------------------- output


def _meta(cfg, device, seconds):
    import diffusers
    import triton

    meta = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        commit=_git_commit(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({_cpu_name()})",
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        torch=torch.__version__, triton=triton.__version__, diffusers=diffusers.__version__,
        python=platform.python_version(),
        dtype=cfg.dtype, batch=BATCH, unet=cfg.model_path or f"built-in {cfg.unet_size} (seeded random weights)",
        num_steps=cfg.num_steps, steps=list(cfg.steps), repeats=cfg.repeats, warmup=1, seed=cfg.seed,
        label=CPU_LABEL if device.type == "cpu" else "CUDA kernel timings",
        cudnn_benchmark=device.type == "cuda",
        triton_interpret=hidiff_kernels.interpreter_enabled(),
        total_s=round(seconds, 1),
    )
    return meta


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    if os.environ.get("HIDIFF_COMMIT"):  # set where the tree travels without .git (the GPU device check)
        return os.environ["HIDIFF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(result) -> str:
    """The results as a plain-text table, one block per (model, image size)."""
    meta, rows = result["meta"], result["rows"]
    threads = f", {meta['cores']} cores, {meta['threads']} threads" if meta.get("threads") else ""
    lines = [f"hidiff bench: {meta['device']}{threads}, {meta['dtype']}, UNet: {meta['unet']}, "
             f"CFG batch {meta['batch']}, median of {meta['repeats']} after 1 warm-up ({meta['label']})"]
    if meta["device"].startswith("cpu"):
        lines.append("peak memory: n/a on CPU; hidiff ops run the torch backend; Triton rows need CUDA")
    header = f"  {'group':<13} {'case':<48} {'median ms':>11} {'speed-up':>9} {'peak MiB':>9} {'rel err':>9}  note"
    current = None
    for r in rows:
        key = (r["model"], r["image"])
        if key != current:
            current = key
            lines += ["", f"{r['model']}: {r['image']} image, {r['latent']} latents", header]
        if r["median_ms"] is None and r["note"]:
            lines.append(f"  {r['group']:<13} {r['case']:<48} {r['note']}")
            continue
        lines.append(
            f"  {r['group']:<13} {r['case']:<48} {_fmt(r['median_ms'], '11.2f')} {_fmt(r['speedup'], '8.2f', 'x'):>9} "
            f"{_fmt(r['peak_mib'], '9.1f'):>9} {_fmt(r['rel_err'], '9.1e'):>9}  {r['note']}".rstrip())
    lines.append("")
    lines.append("speed-up: against the first row of each group (UNet: vanilla; msw: the original roll/partition "
                 "path); rel err: max|out - ref| / max|ref| (triton vs torch backend; op vs the first row)")
    return "\n".join(lines)


def compact_table(result) -> str:
    """One line per (model, image size): the UNet speed-ups against vanilla, the Triton backend's error
    against the torch backend, and each hidiff op's speed-up against its baseline."""
    meta, rows = result["meta"], result["rows"]
    n, steps = meta["num_steps"], meta["steps"]
    unet_cols = [(b, s) for b in ("torch", "triton") for s in steps]
    ops = ("msw", "rad-conv", "upsample-conv")
    head = (f"{'model':<10} {'image':>10} {'vanilla ms':>11} " + " ".join(f"{f'{b} s{s}':>10}" for b, s in unet_cols)
            + f" {'triton err':>10} " + " ".join(f"{o:>13}" for o in ops))
    lines = [f"summary: speed-up of a UNet step vs vanilla, of each hidiff op vs its baseline "
             f"({meta['device']}, {meta['dtype']})", head]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["image"]), []).append(r)
    for (model, image), rs in groups.items():
        by_case = {(r["group"], r["case"]): r for r in rs}
        vanilla = by_case.get(("unet", "vanilla (no HiDiffusion)"), {}).get("median_ms")
        cells = []
        for b, s in unet_cols:
            r = by_case.get(("unet", f"hidiff {b}, step {s}/{n}"))
            cells.append("n/a" if r is None or r["speedup"] is None else f"{r['speedup']:.2f}x")
        errs = [r["rel_err"] for r in rs if r["group"] == "unet" and r["rel_err"] is not None]
        op_cells = []
        for o in ops:
            r = next((r for r in rs if r["group"] == o and r["case"].startswith("hidiff")), None)
            op_cells.append("-" if r is None or r["speedup"] is None else f"{r['speedup']:.2f}x")
        err = _fmt(max(errs) if errs else None, "10.1e")
        lines.append(f"{model.split(' ')[0]:<10} {image:>10} {_fmt(vanilla, '11.1f'):>11} "
                     + " ".join(f"{c:>10}" for c in cells) + f" {err:>10} " + " ".join(f"{c:>13}" for c in op_cells))
    return "\n".join(lines)


def write_json(result, path):
    """Write ``result`` to ``path`` (through a link: to its target) whole or not at all: a run killed mid-write
    keeps its last checkpoint."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, path)
    return path


def require_matplotlib():
    """matplotlib.pyplot with the file-only Agg backend, or UserError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (in a hidiff checkout: pip install '.[plot]')"
                        ) from None
    return plt


def plot(result, path):
    """A horizontal bar chart of the median times, one panel per (model, image size, group)."""
    plt = require_matplotlib()
    panels = {}
    for r in result["rows"]:
        if r["median_ms"] is not None:
            panels.setdefault((r["model"], r["image"], r["group"]), []).append(r)
    if not panels:
        raise UserError("--plot: no timed rows to draw")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.0 + 0.45 * sum(len(v) + 1.5 for v in panels.values())),
                             squeeze=False)
    for ax, ((model, image, group), rows) in zip(axes[:, 0], panels.items()):
        labels = [r["case"] for r in rows]
        values = [r["median_ms"] for r in rows]
        bars = ax.barh(range(len(rows)), values, color=["0.6"] + ["tab:blue"] * (len(rows) - 1))
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{model}, {image}: {group}", fontsize=9, loc="left")
        ax.set_xlabel("median ms", fontsize=8)
        for bar, r in zip(bars, rows):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['median_ms']:.1f} ms"
                    + (f"  {r['speedup']:.2f}x" if r["speedup"] else ""), va="center", fontsize=7)
        ax.margins(x=0.3)
    meta = result["meta"]
    fig.suptitle(f"hidiff bench: {meta['device']}, {meta['dtype']}, {meta['label']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
