"""The ``hidiff`` command: help texts, one-line errors, a tiny CPU bench run, generate with a tiny local pipeline."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hidiff_kernels
from hidiff_models import bench, cli

TRITON_ROW = "n/a (needs CUDA; interpreter timings are not kernel performance)"


@pytest.fixture(autouse=True)
def restore_process_state(monkeypatch):
    """main() sets the hub to offline mode and the bench its thread count: undo both after each test."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(capsys, *argv):
    """(exit status, stdout, stderr) of cli.main(argv) in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse: --help and usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def subcommand_parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return parser, sub.choices


@pytest.mark.parametrize("command", [None, "bench", "generate"])
def test_help_lists_every_option(capsys, command):
    parser, subs = subcommand_parsers()
    target = parser if command is None else subs[command]
    code, out, _ = run_main(capsys, *([command] if command else []), "--help")
    assert code == 0
    options = [s for a in target._actions for s in a.option_strings]
    assert options
    for option in options:
        assert option in out, f"{option} missing from `hidiff {command or ''} --help`"
    for action in target._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    if command is None:
        assert "bench" in out and "generate" in out


def test_module_entry_point_and_generate_missing_path():
    """`python -m hidiff_models` runs the CLI; a missing model is one line on stderr, exit 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "hidiff_models", "generate", "--model", "/nonexistent/model",
                           "--prompt", "a cat"], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, "/nonexistent/model", "no such file or folder")


def test_generate_folder_without_weights(capsys, tmp_path):
    code, _, err = run_main(capsys, "generate", "--model", str(tmp_path), "--prompt", "x")
    assert_one_line_error(code, err, "model_index.json")

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    code, _, err = run_main(capsys, "generate", "--model", str(tmp_path), "--prompt", "x")
    assert_one_line_error(code, err, "no UNet weights")

    code, _, err = run_main(capsys, "bench", "--model", str(tmp_path), "--device", "cpu")
    assert_one_line_error(code, err, "no UNet weights")


def test_generate_rejects_bad_files_and_sizes(capsys, tmp_path, monkeypatch):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    code, _, err = run_main(capsys, "generate", "--model", str(bogus), "--prompt", "x")
    assert_one_line_error(code, err, "safetensors")

    # .ckpt pickles are refused up front (from_single_file would load one as SD1.5 even when it is SDXL)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    code, _, err = run_main(capsys, "generate", "--model", str(ckpt), "--prompt", "x")
    assert_one_line_error(code, err, "expected a diffusers folder or a .safetensors file")

    code, _, err = run_main(capsys, "generate", "--model", str(tmp_path), "--prompt", "x", "--height", "1001")
    assert_one_line_error(code, err, "--height")

    from safetensors.torch import save_file

    no_unet = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(no_unet))
    code, _, err = run_main(capsys, "generate", "--model", str(no_unet), "--prompt", "x")
    assert_one_line_error(code, err, "no Stable Diffusion UNet weights")

    # A single file needs its configs from the hub cache: offline and uncached (an empty cache, whatever this
    # machine holds), a clear refusal, no download.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    single = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(single))
    code, _, err = run_main(capsys, "generate", "--model", str(single), "--prompt", "x", "--height", "64",
                            "--width", "64", "--threads", "1")
    assert code == 2 and "Traceback" not in err
    assert "use a diffusers folder instead" in err.strip().splitlines()[-1]


def test_bench_bad_arguments(capsys):
    code, _, err = run_main(capsys, "bench", "--model", "/nonexistent/unet")
    assert_one_line_error(code, err, "/nonexistent/unet")
    code, _, err = run_main(capsys, "bench", "--device", "cpu", "--steps-to-time", "60")
    assert_one_line_error(code, err, "--steps-to-time")
    code, _, err = run_main(capsys, "bench", "--sizes", "100")  # argparse: usage line + error line
    assert code == 2 and "multiples of 8" in err and "Traceback" not in err


def test_bench_tiny_writes_json(capsys, tmp_path):
    out_json = tmp_path / "out" / "bench.json"
    code, out, err = run_main(capsys, "bench", "--device", "cpu", "--unet-size", "tiny", "--sizes", "64",
                              "--repeats", "1", "--threads", "1", "--json", str(out_json))
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert set(result) == {"meta", "rows"}
    meta = result["meta"]
    for key in ("date", "commit", "device", "torch", "triton", "diffusers", "dtype", "batch", "unet", "num_steps",
                "steps", "repeats", "label", "total_s"):
        assert key in meta
    assert meta["dtype"] == "fp32" and meta["batch"] == 2 and meta["steps"] == [0, 49]
    assert meta["label"] == bench.CPU_LABEL
    rows = result["rows"]
    row_keys = {"model", "image", "latent", "group", "case", "median_ms", "times_ms", "speedup", "peak_mib",
                "rel_err", "note"}
    assert all(set(r) == row_keys for r in rows)
    assert {r["model"] for r in rows} == {"sd15", "sdxl"}
    assert {r["group"] for r in rows} == {"unet", "msw", "rad-conv", "upsample-conv"}
    for model in ("sd15", "sdxl"):
        unet_rows = [r["case"] for r in rows if r["model"] == model and r["group"] == "unet"]
        assert unet_rows == ["vanilla (no HiDiffusion)", "hidiff torch, step 0/50", "hidiff torch, step 49/50",
                             "hidiff triton, step 0/50", "hidiff triton, step 49/50"]
    for r in rows:
        if "triton" in r["case"]:  # never timed through the interpreter
            assert r["median_ms"] is None and r["note"] == TRITON_ROW
        else:
            assert r["median_ms"] > 0 and len(r["times_ms"]) == 1 and r["speedup"] > 0 and r["peak_mib"] is None
        if r["case"].startswith(("hidiff reference op", "hidiff torch backend")):  # against the original composition
            assert r["rel_err"] < 1e-5, r
    assert "vanilla (no HiDiffusion)" in out and TRITON_ROW in out and "sd15: 64x64 image, 8x8 latents" in out
    assert str(out_json) in err


def test_a_json_write_cut_short_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    # The bench rewrites its JSON after every row: a run killed mid-write must leave the rows written before.
    path = tmp_path / "bench.json"
    bench.write_json({"rows": [1]}, path)

    def killed_mid_write(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        bench.write_json({"rows": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"rows": [1]}


def test_a_json_path_that_is_a_link_is_written_through(tmp_path):
    target = tmp_path / "results" / "bench.json"
    target.parent.mkdir()
    link = tmp_path / "bench.json"
    link.symlink_to(target)
    bench.write_json({"rows": [1]}, link)
    assert link.is_symlink() and json.loads(target.read_text()) == {"rows": [1]}


def test_an_interrupted_bench_says_where_its_rows_so_far_are(capsys, tmp_path, monkeypatch):
    def interrupted_run(cfg, checkpoint):
        checkpoint({"meta": {"partial": True}, "rows": [1]})
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupted_run)
    out_json = tmp_path / "bench.json"
    code, _, err = run_main(capsys, "bench", "--device", "cpu", "--json", str(out_json))
    assert code == 130 and "Traceback" not in err
    assert f"the rows of the sizes finished so far: {out_json}" in err and err.strip().endswith("interrupted")
    assert json.loads(out_json.read_text())["rows"] == [1]


@pytest.fixture
def applied_model_types(monkeypatch):
    """The model_type of every apply_hidiffusion call the bench makes, in call order."""
    import hidiff_models

    model_types = []
    real_apply = hidiff_models.apply_hidiffusion
    monkeypatch.setattr(hidiff_models, "apply_hidiffusion",
                        lambda unet, **kw: model_types.append(kw["model_type"]) or real_apply(unet, **kw))
    return model_types


@pytest.mark.parametrize("model_type, applied", [("sd21", "sd15"), ("sdxl_turbo", "sdxl_turbo")])
def test_bench_other_model_types(capsys, tmp_path, applied_model_types, model_type, applied):
    out_json = tmp_path / "bench.json"
    code, out, err = run_main(capsys, "bench", "--model-type", model_type, "--device", "cpu", "--unet-size", "tiny",
                              "--sizes", "64", "--repeats", "1", "--threads", "1", "--json", str(out_json))
    assert code == 0, err
    assert applied_model_types == [applied]  # the torch backend's step rows (the triton ones need CUDA)
    rows = json.loads(out_json.read_text())["rows"]
    assert {r["model"] for r in rows} == {model_type}
    assert {r["group"] for r in rows} == {"unet", "msw", "rad-conv", "upsample-conv"}
    assert all(r["median_ms"] > 0 for r in rows if "triton" not in r["case"])
    assert f"{model_type}: 64x64 image, 8x8 latents" in out


def test_original_window_attention_baseline_matches_reference():
    """The bench's 'original roll/partition' attn1 computes the same function as the torch backend's path."""
    from diffusers.models.attention_processor import Attention

    from hidiff_models.processors import shift_for_phase, window_attention

    attn = Attention(query_dim=24, heads=3, dim_head=8).eval()
    for hw in [(8, 8), (6, 10), (4, 12)]:
        for phase in range(4):
            shift = shift_for_phase(*hw, phase)
            x = torch.randn(2, hw[0] * hw[1], 24)
            with torch.no_grad():
                original = bench.original_window_attn(attn, x, hw, shift)
                ours = window_attention(attn, x, hw, shift, fused=False)
            torch.testing.assert_close(ours, original, rtol=1e-5, atol=1e-6)


def test_plot_or_clear_message(capsys, tmp_path):
    row = dict(model="sd15", image="64x64", latent="8x8", group="unet", case="vanilla (no HiDiffusion)",
               median_ms=12.5, times_ms=[12.5], speedup=1.0, peak_mib=None, rel_err=None, note="")
    result = {"meta": {"device": "cpu", "dtype": "fp32", "label": bench.CPU_LABEL}, "rows": [row]}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(cli.UserError, match="matplotlib"):
            bench.plot(result, tmp_path / "plot.png")
        code, _, err = run_main(capsys, "bench", "--device", "cpu", "--plot", str(tmp_path / "plot.png"))
        assert_one_line_error(code, err, "pip install matplotlib")  # refused before any timing
    else:
        path = bench.plot(result, tmp_path / "plot.png")
        assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A tiny SD1.5-layout text-to-image pipeline saved as a local diffusers folder."""
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from hidiff_models.configs import build_unet

    folder = tmp_path_factory.mktemp("tiny_pipeline")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",  # SD1.5's
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=build_unet("sd15", "tiny"), vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_generate_with_tiny_local_pipeline(capsys, tmp_path, tiny_pipeline):
    from PIL import Image

    output = tmp_path / "images" / "out.png"
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_pipeline), "--prompt", "a cat", "--height", "64",
                            "--width", "96", "--steps", "2", "--device", "cpu", "--backend", "torch",
                            "--output", str(output))
    assert code == 0, err
    assert Image.open(output).size == (96, 64)
    assert "saved" in err


def test_generate_refuses_triton_where_it_cannot_run_before_loading(capsys, monkeypatch, tiny_pipeline):
    monkeypatch.setattr(hidiff_kernels, "triton_runs_on", lambda device: False)  # CPU without TRITON_INTERPRET
    monkeypatch.setattr(cli, "load_pipeline", lambda *args: pytest.fail("loaded before refusing"))
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_pipeline), "--prompt", "a cat", "--device", "cpu",
                            "--backend", "triton")
    assert_one_line_error(code, err, "--backend triton: the Triton kernels need CUDA")


def test_generate_and_bench_with_fp16_variant_weights(capsys, tmp_path, tiny_pipeline):
    # A download with variant="fp16" leaves only model.fp16.safetensors-style files: from_pretrained finds none
    # of its plain names unless told the variant.
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, folder)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".fp16.safetensors"))
    assert not any(folder.glob("unet/diffusion_pytorch_model.safetensors"))
    code, _, err = run_main(capsys, "generate", "--model", str(folder), "--prompt", "a cat", "--height", "64",
                            "--width", "64", "--steps", "2", "--device", "cpu", "--backend", "torch",
                            "--output", str(tmp_path / "out.png"))
    assert code == 0 and (tmp_path / "out.png").is_file(), err
    code, _, err = run_main(capsys, "bench", "--model", str(folder), "--device", "cpu", "--sizes", "64",
                            "--repeats", "1", "--threads", "1", "--no-kernels", "--json", str(tmp_path / "b.json"))
    assert code == 0, err


@pytest.mark.parametrize("files, dtype, variant", [
    (["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"], torch.float16, None),
    (["diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-00001-of-00002.safetensors"],
     torch.float16, None),
    (["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bf16.safetensors"], torch.bfloat16, "bf16"),
    (["diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bf16.safetensors"], torch.float32, "bf16"),
    (["diffusion_pytorch_model.safetensors.index.fp16.json", "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"],
     torch.float32, "fp16"),
])
def test_weights_variant_of_a_model_folder(tmp_path, files, dtype, variant):
    for name in files + ["config.json"]:
        (tmp_path / name).touch()
    assert bench.weights_variant(tmp_path, dtype) == variant


def test_bench_with_local_unet_folder(capsys, tmp_path, tiny_pipeline):
    code, out, err = run_main(capsys, "bench", "--model", str(tiny_pipeline), "--device", "cpu", "--sizes", "64",
                              "--repeats", "1", "--threads", "1", "--no-kernels", "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["group"] for r in rows] == ["unet"] * 5 and rows[0]["model"].startswith("sd15 (")


@pytest.mark.skipif(not torch.cuda.is_available() and not hidiff_kernels.interpreter_enabled(),
                    reason="the Triton rows need CUDA or TRITON_INTERPRET=1")
def test_bench_triton_rows_pair_with_torch_rows():
    """The Triton rows' errors compare against the torch backend with the same window shifts (interpreter on CPU:
    ~30 s for the smallest SD1.5 map, 4x4 latents)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bench.BenchConfig(models=["sd15"], device=device, dtype="fp32", unet_size="tiny", sizes=[(32, 32)],
                            repeats=1, threads=1, triton_on_cpu=True)
    rows = bench.run(cfg)["rows"]
    triton = [r for r in rows if "triton" in r["case"] or "fused Triton" in r["case"]]
    assert len(triton) == 2 + 3  # two UNet steps, three ops
    for r in triton:
        assert r["median_ms"] > 0 and r["rel_err"] < 1e-4, r


def test_generate_checks_output_and_numbers_before_loading(capsys, tmp_path, tiny_pipeline):
    for output, fragment in ((tmp_path / "out.txt", "cannot write an RGB image as .txt"),
                             (tmp_path / "out.xbm", "cannot write an RGB image as .xbm"),  # PIL's XBM is 1-bit
                             (tmp_path, "is a folder")):
        code, _, err = run_main(capsys, "generate", "--model", str(tiny_pipeline), "--prompt", "x", "--output",
                                str(output), "--height", "64", "--width", "64", "--steps", "1", "--device", "cpu")
        assert_one_line_error(code, err, "--output", fragment)  # one line: nothing was loaded or generated
    for option, value, fragment in (("--guidance", "nan", "finite"), ("--seed", str(2**64), "2**63")):
        code, _, err = run_main(capsys, "generate", "--model", str(tiny_pipeline), "--prompt", "x", option, value)
        assert code == 2 and fragment in err and "Traceback" not in err  # argparse: usage line + error line


def test_model_type_that_does_not_match_the_checkpoint_is_refused(capsys, tiny_pipeline):
    code, _, err = run_main(capsys, "bench", "--model", str(tiny_pipeline), "--model-type", "sdxl_turbo",
                            "--device", "cpu")
    assert_one_line_error(code, err, "--model-type sdxl_turbo", "of the sd15 family")  # one line: before any timing
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_pipeline), "--model-type", "sdxl",
                            "--prompt", "x", "--height", "64", "--width", "64", "--steps", "1", "--device", "cpu")
    assert_one_line_error(code, err, "--model-type sdxl", "of the sd15 family")  # before the pipeline loads


def test_output_paths_are_checked_before_the_run(capsys, tmp_path, tiny_pipeline, monkeypatch):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would go")
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_pipeline), "--prompt", "x", "--height", "64",
                            "--width", "64", "--steps", "1", "--device", "cpu", "--output", str(blocker / "a.png"))
    assert_one_line_error(code, err, "--output", "is a file, not a folder")
    for option, path in (("--json", blocker / "sub" / "b.json"), ("--json", tmp_path), ("--plot", blocker / "p.png")):
        code, _, err = run_main(capsys, "bench", "--device", "cpu", "--sizes", "64", "--repeats", "1",
                                option, str(path))
        assert_one_line_error(code, err, option)  # one line: no header, nothing timed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # as a read-only file for a user, not root
    code, _, err = run_main(capsys, "bench", "--device", "cpu", "--json", str(blocker))
    assert_one_line_error(code, err, "--json", "the file exists and is not writable")


def test_an_unsupported_local_unet_is_refused_before_loading_it(capsys, tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
                         cross_attention_dim=8, attention_head_dim=2, sample_size=8).save_pretrained(tmp_path / "unet")
    code, _, err = run_main(capsys, "bench", "--model", str(tmp_path), "--device", "cpu", "--sizes", "64",
                            "--repeats", "1", "--no-kernels", "--json", str(tmp_path / "b.json"))
    assert_one_line_error(code, err, f"--model {tmp_path}", "SD1.5/SD2.x and SDXL UNet layouts",
                          "('CrossAttnDownBlock2D', 'DownBlock2D')")  # one line: nothing loaded or timed
    assert not (tmp_path / "b.json").exists()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    code, _, err = run_main(capsys, "generate", "--model", str(tmp_path), "--prompt", "x", "--height", "64",
                            "--width", "64", "--device", "cpu")
    assert_one_line_error(code, err, f"--model {tmp_path}", "SD1.5/SD2.x and SDXL UNet layouts")


def test_bench_of_a_local_unet_follows_its_model_type(capsys, tmp_path, applied_model_types):
    from hidiff_models.configs import build_unet

    unet = build_unet("sdxl", "tiny")
    for folder in ("sdxl", "sdxl-turbo-copy"):
        unet.save_pretrained(tmp_path / folder / "unet")
    assert bench.local_model_type(tmp_path / "sdxl") == "sdxl"
    sd15 = tmp_path / "sd15-sparse"  # a config.json without the values that equal diffusers' defaults
    build_unet("sd15", "tiny").save_pretrained(sd15)
    config = json.loads((sd15 / "config.json").read_text())
    for key in ("down_block_types", "up_block_types", "addition_embed_type"):
        del config[key]
    (sd15 / "config.json").write_text(json.dumps(config))
    assert bench.local_model_type(sd15) == "sd15"
    assert bench.local_model_type(tmp_path / "sdxl-turbo-copy") == "sdxl_turbo"  # apply_hidiffusion's rule
    cfg = bench.BenchConfig(models=["sdxl"], device="cuda", model_path=str(tmp_path / "sdxl"))
    assert bench._sizes_for(cfg, "sdxl") == [(2048, 2048), (4096, 4096)]  # SDXL's, not SD1.5's 1024 and 2048
    assert bench._sizes_for(cfg, "sdxl_turbo") == [(1024, 1024), (2048, 2048)]
    code, _, err = run_main(capsys, "bench", "--model", str(tmp_path / "sdxl-turbo-copy"), "--device", "cpu",
                            "--sizes", "64", "--repeats", "1", "--threads", "1", "--no-kernels", "--json",
                            str(tmp_path / "b.json"))
    assert code == 0, err
    assert applied_model_types == ["sdxl_turbo"]
    assert {r["model"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]} == {
        f"sdxl_turbo ({tmp_path / 'sdxl-turbo-copy'})"}


def fake_pipeline(folder, model="sd15", **config):
    """A pipeline folder that passes the cheap checks (model_index.json, the UNet's config, a weights file that
    is never loaded): for refusals that must come before loading."""
    from hidiff_models.configs import unet_config

    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({**unet_config(model, "tiny"), **config}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"never loaded")
    return folder


def test_generate_refuses_before_loading(capsys, tmp_path):
    # These failed only after the pipeline had loaded (minutes for a real SDXL) or, for bench, with a traceback.
    generate = ("generate", "--prompt", "x", "--height", "64", "--width", "64", "--device", "cpu")
    inpainting = fake_pipeline(tmp_path / "inpainting", in_channels=9)
    code, _, err = run_main(capsys, *generate, "--model", str(inpainting))
    assert_one_line_error(code, err, "9 input channels", "text-to-image")

    from safetensors.torch import save_file

    single = tmp_path / "inpainting.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}, str(single))
    code, _, err = run_main(capsys, *generate, "--model", str(single))
    assert_one_line_error(code, err, "9 input channels")

    broken = fake_pipeline(tmp_path / "interrupted-download")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to(tmp_path / "blobs" / "never-downloaded")
    code, _, err = run_main(capsys, *generate, "--model", str(broken))
    assert_one_line_error(code, err, "broken link")
    code, _, err = run_main(capsys, "bench", "--model", str(broken), "--device", "cpu")
    assert_one_line_error(code, err, "broken link")
    intact = fake_pipeline(tmp_path / "intact")  # beside intact weights, a broken link of another variant is no matter
    (intact / "unet" / "diffusion_pytorch_model.fp16.safetensors").symlink_to(tmp_path / "blobs" / "deleted")
    assert cli.check_pipeline_path(intact) == (intact, "sd15")


def test_a_hugging_face_cache_folder_points_to_its_snapshots(capsys, tmp_path):
    (tmp_path / "models--org--name" / "snapshots" / "0123abcd").mkdir(parents=True)
    for command in (("generate", "--prompt", "x"), ("bench",)):
        code, _, err = run_main(capsys, *command, "--model", str(tmp_path / "models--org--name"))
        assert_one_line_error(code, err, "give its snapshots/<revision> folder")


def test_paths_starting_with_a_tilde_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--model", "~/sdxl", "--prompt", "x", "--output", "~/out.png"])
    assert (args.model, args.output) == (str(tmp_path / "sdxl"), str(tmp_path / "out.png"))
    args = parser.parse_args(["bench", "--model", "~/sdxl", "--json", "~/b.json", "--plot", "~/b.png"])
    assert (args.model, args.json, args.plot) == tuple(str(tmp_path / n) for n in ("sdxl", "b.json", "b.png"))


def test_turbo_is_detected_from_a_relative_path(monkeypatch, tmp_path):
    turbo = fake_pipeline(tmp_path / "sdxl-turbo", "sdxl")
    monkeypatch.chdir(turbo)
    assert bench.local_model_type(".") == "sdxl_turbo"
    assert cli.check_pipeline_path(".") == (turbo, "sdxl_turbo")


def test_a_single_turbo_file_gets_the_turbo_schedule(monkeypatch, capsys, tmp_path):
    # from_single_file leaves the pipeline without a name: the file's name tells SDXL-Turbo, as a folder's does.
    from safetensors.torch import save_file

    single = tmp_path / "sd_xl_turbo_1.0.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}, str(single))
    assert cli.check_pipeline_path(single) == (single, "sdxl_turbo")
    loaded = []

    def load_pipeline(p, model_type, dtype):  # the model type the generation would apply, then stop
        loaded.append(model_type)
        raise cli.UserError("not loaded in this test")

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)
    run_main(capsys, "generate", "--model", str(single), "--prompt", "x", "--device", "cpu")
    assert loaded == ["sdxl_turbo"]
