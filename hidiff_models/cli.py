"""The ``hidiff`` command: ``hidiff bench`` (timings) and ``hidiff generate`` (an image with a local checkpoint).

Nothing is ever downloaded: every load passes local_files_only=True (main() also marks the process offline, which
the libraries that are imported after it read).
Errors are one line on stderr (exit status 2 for bad arguments or inputs, 1 for failures while running);
set HIDIFF_DEBUG=1 to see the traceback instead.
"""
import argparse
import io
import json
import math
import os
import sys
import time


class UserError(Exception):
    """A problem with the command's arguments or inputs: reported as one line, exit status 2."""


def _offline():
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ[var] = "1"


def _checked(convert, ok, expected):
    """An argparse type: ``convert(text)``, refused unless ``ok(value)``."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_finite_float = _checked(float, math.isfinite, "a finite number")
_seed = _checked(int, lambda value: 0 <= value < 2**63, "an integer in 0 .. 2**63 - 1 (torch's seed range)")


def _image_size(text):
    """'1024' or '1024x768' (height x width, pixels, multiples of 8) -> (h, w)."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected N or HxW in pixels, got {text!r}") from None
    if len(parts) > 2 or h < 8 or w < 8 or h % 8 or w % 8:
        raise argparse.ArgumentTypeError(f"image size {text!r}: height and width must be multiples of 8, >= 8")
    return h, w


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hidiff",
        description="HiDiffusion with fused Triton kernels: benchmark a UNet denoising step, or generate an image.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = sub.add_parser(
        "bench", help="time a UNet step without / with HiDiffusion (torch and triton backends) and each fused op",
        description="Times side by side, in one run, a UNet denoising step (CFG batch 2) without HiDiffusion and with "
        "backend='torch' and backend='triton' (CUDA only) at an early step (RAU-Net + MSW-MSA) and a late step "
        "(MSW-MSA only), plus each fused op against its baselines. Defaults on CUDA: the real SD1.5 and SDXL "
        "architectures (seeded random weights, no download) in fp16 at SD1.5 1024/2048 and SDXL 2048/4096 pixels. "
        "Defaults on CPU: the tiny built-in UNets (real block layout, narrow channels) in fp32 at 512 pixels; "
        "CPU timings are PyTorch reference timings, not kernel performance.",
    )
    bench.add_argument("--model-type", choices=("sd15", "sd21", "sdxl", "sdxl_turbo", "all"), default="all",
                       help="built-in UNet(s) to time (default: all = sd15 and sdxl; sd21 on CUDA at 1536 and "
                            "3072 px; sdxl_turbo: SDXL's UNet with SDXL-Turbo's schedule, at 1024 and 2048 px); "
                            "with --model, the model type ('all': detect it, SDXL-Turbo by 'turbo' in the "
                            "checkpoint folder's name)")
    bench.add_argument("--model", metavar="PATH", type=os.path.expanduser,
                       help="a local diffusers pipeline folder (its unet/) or UNet folder instead of the "
                            "built-in UNets")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    bench.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    bench.add_argument("--unet-size", choices=("tiny", "full"),
                       help="built-in UNet size: 'full' real architecture, 'tiny' narrow channels "
                            "(default: full on cuda, tiny on cpu)")
    bench.add_argument("--sizes", nargs="+", type=_image_size, metavar="SIZE",
                       help="image sizes in pixels, N or HxW, multiples of 8 (latents are 1/8); default: "
                            "cuda SD1.5 1024 2048, SDXL 2048 4096; cpu 512")
    bench.add_argument("--num-steps", type=_positive_int, default=50, metavar="N",
                       help="denoising steps of the schedule the timed steps belong to (default: 50)")
    bench.add_argument("--steps-to-time", nargs="+", type=int, metavar="STEP",
                       help="0-based steps to time with HiDiffusion (default: 0 and N-1, i.e. RAU-Net active "
                            "and MSW-MSA only)")
    bench.add_argument("--repeats", type=_positive_int, metavar="N",
                       help="timed calls per case after one warm-up; the median is reported "
                            "(default: 5 on cuda, 3 on cpu)")
    bench.add_argument("--seed", type=_seed, default=0, help="seed of the weights, inputs and window shifts (default: 0)")
    bench.add_argument("--threads", type=_positive_int, metavar="N",
                       help="CPU threads for torch (default: torch's; 1 when other work keeps every core busy)")
    bench.add_argument("--no-kernels", dest="kernels", action="store_false",
                       help="time only the UNet step, not the individual ops")
    bench.add_argument("--json", metavar="PATH", default=None, type=os.path.expanduser,
                       help="where to write all results as JSON (default: bench-results/bench.json)")
    bench.add_argument("--plot", metavar="PATH", type=os.path.expanduser,
                       help="also draw a bar chart of the timings (PNG; needs matplotlib: pip install matplotlib)")
    bench.set_defaults(func=cmd_bench)

    gen = sub.add_parser(
        "generate", help="generate an image with HiDiffusion from a local checkpoint (never downloads)",
        description="Text-to-image with a local SD1.5/SD2.x/SDXL checkpoint and HiDiffusion applied. PATH is a "
        "diffusers pipeline folder (with model_index.json) or a single .safetensors file (single files need the "
        "model's configs in the local Hugging Face cache). Nothing is downloaded.",
    )
    gen.add_argument("--model", metavar="PATH", required=True, type=os.path.expanduser,
                     help="diffusers pipeline folder or .safetensors file")
    gen.add_argument("--prompt", required=True, help="the text prompt")
    gen.add_argument("--negative-prompt", default=None, help="what the image should not show")
    gen.add_argument("--height", type=int, default=2048, help="image height in pixels, multiple of 8 (default: 2048)")
    gen.add_argument("--width", type=int, default=2048, help="image width in pixels, multiple of 8 (default: 2048)")
    gen.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default: 50)")
    gen.add_argument("--guidance", type=_finite_float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    gen.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise and window shifts (default: 0)")
    gen.add_argument("--model-type", choices=("sd15", "sdxl", "sdxl_turbo"),
                     help="sd15 (also SD 2.x), sdxl or sdxl_turbo (default: from the UNet's architecture; "
                          "SDXL-Turbo only when 'turbo' is in the checkpoint folder's name)")
    gen.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                     help="HiDiffusion ops: triton (fused kernels, CUDA), torch (plain PyTorch), auto (triton on CUDA)")
    gen.add_argument("--no-raunet", dest="raunet", action="store_false", help="MSW-MSA only, without RAU-Net")
    gen.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    gen.add_argument("--threads", type=_positive_int, metavar="N",
                     help="CPU threads for torch (default: torch's; 1 when other work keeps every core busy)")
    gen.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    gen.add_argument("--output", default="hidiff.png", metavar="PNG", type=os.path.expanduser,
                     help="where to save the image (default: hidiff.png)")
    gen.set_defaults(func=cmd_generate)
    return parser


def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return device, args.dtype or ("fp16" if device == "cuda" else "fp32")


def cmd_bench(args):
    from . import bench

    device, dtype = _device_and_dtype(args)
    defaults = bench.default_config(device)
    steps = args.steps_to_time if args.steps_to_time is not None else [0, args.num_steps - 1]
    bad = [s for s in steps if not 0 <= s < args.num_steps]
    if bad:
        raise UserError(f"--steps-to-time {bad[0]}: outside 0..{args.num_steps - 1} (--num-steps {args.num_steps})")
    models = ["sd15", "sdxl"] if args.model_type == "all" else [args.model_type]
    if args.model:
        detected = bench.local_model_type(args.model)
        model_type = _model_type_for(args.model_type, args.model, detected)
        models = [model_type]
    json_path = args.json or bench.DEFAULT_JSON
    _check_writable("--json", json_path)  # the outputs are checked before the run, not after it
    if args.plot:
        _check_writable("--plot", args.plot)
        bench.require_matplotlib()
    cfg = bench.BenchConfig(
        models=models, device=device, dtype=dtype, unet_size=args.unet_size or defaults["unet_size"],
        model_path=args.model, sizes=args.sizes, num_steps=args.num_steps, steps=sorted(set(steps)),
        repeats=args.repeats or defaults["repeats"], seed=args.seed, kernels=args.kernels, threads=args.threads,
    )
    unet = args.model or f"built-in {cfg.unet_size} UNets ({', '.join(models)}; seeded random weights)"
    table = bench.CUDA_SIZES if device == "cuda" else bench.CPU_SIZES
    if cfg.sizes:
        sizes = ", ".join(f"{h}x{w}" for h, w in cfg.sizes)
    else:
        sizes = "; ".join(f"{m} {', '.join(map(str, table[m]))}" for m in models)
    print(f"hidiff bench on {device} ({dtype}): {unet}; image sizes {sizes}; steps {cfg.steps} of {cfg.num_steps}; "
          f"{cfg.repeats} repeats", file=sys.stderr)
    if device == "cpu":
        print(f"{bench.CPU_LABEL}: the Triton rows need CUDA", file=sys.stderr)
    checkpointed = []  # an interrupted run says where the rows of the sizes it finished are
    try:
        result = bench.run(cfg, checkpoint=lambda partial: checkpointed.append(bench.write_json(partial, json_path)))
    except KeyboardInterrupt:
        if checkpointed:
            print(f"the rows of the sizes finished so far: {checkpointed[-1]} (meta.partial: true)", file=sys.stderr)
        raise
    print(bench.format_table(result))
    print()
    print(bench.compact_table(result))
    json_path = bench.write_json(result, json_path)
    print(f"\nresults: {json_path} ({result['meta']['total_s']} s)", file=sys.stderr)
    if args.plot:
        print(f"plot: {bench.plot(result, args.plot)}", file=sys.stderr)
    return 0


def _model_type_for(requested, path, detected):
    """The model type to run a local checkpoint with: --model-type ``requested`` (None or "all": ``detected``),
    refused before anything loads when it names the other family than the UNet at ``path``."""
    from .bench import FAMILY

    if requested in (None, "all"):
        return detected
    if FAMILY[requested] != FAMILY[detected]:
        raise UserError(f"--model-type {requested}: {path} holds a UNet of the {FAMILY[detected]} family")
    return requested


def check_pipeline_path(path):
    """(absolute Path, detected model type) of a local diffusers pipeline folder or single checkpoint file, after
    the cheap checks: a text-to-image UNet (4 input channels) of a supported layout (a single file's family: SDXL
    if it holds SDXL's text conditioner, else SD1.5). SDXL-Turbo is known by the folder's or file's name."""
    from pathlib import Path

    from .schedule import named_model_type

    p = Path(os.path.abspath(path))  # absolute: the checkpoint's name (SDXL-Turbo) is its folder's, even for "."
    if not p.exists():
        raise UserError(f"--model {path}: no such file or folder")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"--model {path}: expected a diffusers folder or a .safetensors file")
        keys, in_channels = _checkpoint_keys(p)
        family = "sdxl" if any(k.startswith("conditioner.") for k in keys) else "sd15"
        model_type = named_model_type(family, str(p))
    else:
        if not (p / "model_index.json").is_file():
            if (p / "config.json").is_file():
                hint = " (a UNet folder: hidiff bench --model takes it, generate needs the whole pipeline)"
            else:
                hint = hf_cache_hint(p)
            raise UserError(f"--model {path}: not a diffusers pipeline folder (no model_index.json){hint}")
        unet = p / "unet"
        from .bench import missing_weights

        problem = missing_weights(unet)
        if problem:
            raise UserError(f"--model {path}: {problem}")
        from .adapter import detected_model_type

        try:  # an unsupported UNet is refused before the pipeline loads
            config = json.loads((unet / "config.json").read_text())
            model_type = detected_model_type(config, str(p))
        except (OSError, ValueError) as e:
            raise UserError(f"--model {path}: {first_line(e)}") from None
        in_channels = config.get("in_channels", 4)
    if in_channels != 4:
        raise UserError(f"--model {path}: its UNet takes {in_channels} input channels (an inpainting or "
                        "image-conditioned model); generate is text-to-image")
    return p, model_type


def hf_cache_hint(folder):
    """A hint for a Hugging Face cache folder (models--org--name) given where its snapshot was meant."""
    is_cache = (folder / "snapshots").is_dir()
    return " (a Hugging Face cache folder: give its snapshots/<revision> folder)" if is_cache else ""


def load_pipeline(p, model_type, dtype):
    """A text-to-image pipeline from a local diffusers folder or single .safetensors file checked by
    check_pipeline_path (its path and model type); UserError if unusable."""
    if p.is_file():
        return _load_single_file(p, model_type, dtype)
    from diffusers import AutoPipelineForText2Image

    from .bench import torch_dtype_quiet, weights_variant

    try:
        with torch_dtype_quiet():
            return AutoPipelineForText2Image.from_pretrained(p, torch_dtype=dtype, local_files_only=True,
                                                             variant=weights_variant(p / "unet", dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"--model {p}: could not load the pipeline: {first_line(e)}") from None


def _checkpoint_keys(p):
    """(tensor names, UNet input channels) of a single-file .safetensors checkpoint holding a Stable Diffusion UNet."""
    from safetensors import safe_open

    first_conv = "model.diffusion_model.input_blocks.0.0.weight"
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            in_channels = f.get_slice(first_conv).get_shape()[1] if first_conv in keys else 4
    except Exception as e:  # not a safetensors file at all
        raise UserError(f"--model {p}: not a readable .safetensors file: {first_line(e)}") from None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UserError(f"--model {p}: no Stable Diffusion UNet weights (model.diffusion_model.*) in this file")
    return keys, in_channels


def _load_single_file(p, model_type, dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .bench import torch_dtype_quiet

    cls = StableDiffusionPipeline if model_type == "sd15" else StableDiffusionXLPipeline
    try:
        with torch_dtype_quiet():
            return cls.from_single_file(str(p), torch_dtype=dtype, local_files_only=True)
    except Exception as e:
        raise UserError(
            f"--model {p}: could not load the single file offline ({first_line(e)}); diffusers needs the model's "
            "configs in the local Hugging Face cache for single files: use a diffusers folder instead") from None


def cmd_generate(args):
    import torch

    for name in ("height", "width"):
        value = getattr(args, name)
        if value < 8 or value % 8:
            raise UserError(f"--{name} {value}: must be a positive multiple of 8")
    model, detected = check_pipeline_path(args.model)
    # detected, not left to apply: a single file's name tells SDXL-Turbo, which the loaded pipeline cannot
    model_type = _model_type_for(args.model_type, args.model, detected)
    out = _output_path(args.output)
    device, dtype_name = _device_and_dtype(args)
    from hidiff_kernels import triton_runs_on

    if args.backend == "triton" and not triton_runs_on(torch.device(device)):  # before the long load, not after
        raise UserError(f"--backend triton: the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU); this runs "
                        f"on {device}: use --backend torch or auto")
    from .bench import DTYPES, cpu_threads, quiet_diffusers

    if device == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))

    started = time.perf_counter()
    print(f"loading {args.model} ({dtype_name}, {device})", file=sys.stderr)
    with quiet_diffusers():
        pipe = load_pipeline(model, model_type, DTYPES[dtype_name]).to(device)
    from . import apply_hidiffusion

    try:
        apply_hidiffusion(pipe, backend=args.backend, apply_raunet=args.raunet, generator=args.seed,
                          model_type=model_type)
    except ValueError as e:
        raise UserError(f"HiDiffusion cannot be applied: {first_line(e)}") from None
    if args.height * args.width > 2048 * 2048 and hasattr(pipe, "enable_vae_tiling"):
        pipe.enable_vae_tiling()  # decoding a 4096² image in one piece needs tens of GB
        print("VAE tiling on (image larger than 2048x2048)", file=sys.stderr)
    print(f"HiDiffusion applied (backend {args.backend}); generating {args.height}x{args.width} (height x width), "
          f"{args.steps} steps", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.inference_mode():
        image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                     num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator).images[0]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    image.save(out)
    print(f"saved {out} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


def _output_path(path):
    """The absolute --output path, checked before the generation: an image file whose format PIL can write."""
    from PIL import Image

    out = os.path.abspath(path)
    if os.path.isdir(out):
        example = os.path.join(path, "hidiff.png")
        raise UserError(f"--output {path}: is a folder; give an image file name such as {example}")
    extension = os.path.splitext(out)[1].lower()
    try:  # a format PIL knows may still refuse RGB images (.xbm): try one pixel
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=Image.registered_extensions()[extension])
    except Exception:
        raise UserError(f"--output {path}: PIL cannot write an RGB image as "
                        f"{extension or 'a file without an extension'}; use .png, .jpg or .webp") from None
    _check_writable("--output", path)
    return out


def _check_writable(option, path):
    """Refuse an output file that could not be written after a long run: a folder at its place, a file there
    that is not writable, a file in the way of its folder, or a folder (or the nearest existing one above it)
    that takes no new file (the bench's JSON is written beside its place, then renamed)."""
    import tempfile

    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder, not a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: the file exists and is not writable")
    folder = os.path.dirname(os.path.realpath(path))  # a link's target's folder, which writing it needs
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{option} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in {folder} ({e.strerror or e})") from None


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv=None):
    _offline()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"hidiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hidiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("HIDIFF_DEBUG"):
            raise
        print(f"hidiff {args.command}: error: {type(e).__name__}: {first_line(e)} "
              "(set HIDIFF_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
