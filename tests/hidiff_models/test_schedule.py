"""RAU-Net schedule tables, written out by hand from ../shared/docs/hidiffusion-method.md (not recomputed), and the
checkpoint names that select the SDXL-Turbo and Playground variants."""

import pytest

from hidiff_models import schedule
from hidiff_models.schedule import ActiveOps, active_ops, profile


def active_steps(model_type, size, n, **flags):
    """(steps with RAD-conv active, steps with RAD-pool/RAU-interp active) over a run of n steps."""
    ops = [active_ops(model_type, *size, step, n, **flags) for step in range(n)]
    return [s for s, o in enumerate(ops) if o.rad_conv], [s for s, o in enumerate(ops) if o.rad_pool]


def steps(start, stop):
    return list(range(start, stop))


NONE = []

# (model_type, latent size, flags, n, RAD-conv steps, RAD-pool steps)
TABLE = [
    # sd15_1024 (H < 256 or W < 256): RAD-conv T1 = 0.4 n, RAD-pool T2 = 0
    ("sd15", (128, 128), {}, 10, steps(0, 4), NONE),
    ("sd15", (300, 200), {}, 20, steps(0, 8), NONE),
    ("sd15", (128, 96), {}, 50, steps(0, 20), NONE),
    # sd15_2048: RAD-conv T1 = 0.7 n, RAD-pool T2 = 0.3 n
    ("sd15", (256, 256), {}, 10, steps(0, 7), steps(0, 3)),
    ("sd15", (256, 320), {}, 20, steps(0, 14), steps(0, 6)),
    ("sd15", (320, 256), {}, 50, steps(0, 35), steps(0, 15)),
    ("sd15", (256, 256), {}, 90, steps(0, 62), steps(0, 27)),  # int(90 * 0.7) == 62 in floats
    # sdxl_2048, aggressive: RAD-conv before int(8/50 n); RAD-pool from there to T1 = 0.4 n
    ("sdxl", (128, 128), {}, 10, steps(0, 1), steps(1, 4)),
    ("sdxl", (512, 256), {}, 20, steps(0, 3), steps(3, 8)),
    ("sdxl", (256, 384), {}, 50, steps(0, 8), steps(8, 20)),
    # text-to-image ControlNet: T1 = 0.5 n
    ("sdxl", (128, 128), {"controlnet": True}, 10, steps(0, 1), steps(1, 5)),
    ("sdxl", (128, 128), {"controlnet": True}, 20, steps(0, 3), steps(3, 10)),
    ("sdxl", (128, 128), {"controlnet": True}, 50, steps(0, 8), steps(8, 25)),
    # inpainting / Playground: not aggressive; RAD-conv T2 = 0, RAD-pool T1 = 0.4 n
    ("sdxl", (128, 128), {"inpainting": True}, 10, NONE, steps(0, 4)),
    ("sdxl", (128, 128), {"inpainting": True}, 50, NONE, steps(0, 20)),
    ("sdxl", (128, 128), {"playground": True}, 20, NONE, steps(0, 8)),
    ("sdxl", (128, 128), {"inpainting": True, "controlnet": True}, 20, NONE, steps(0, 10)),
    # sdxl_4096: RAD-conv T2 = 0.3 n, RAD-pool T1 = 0.7 n, never aggressive (as a freshly loaded original:
    # its aggressive mode, once set below 4096 px, sticks; README); ControlNet ratio is 2048-only
    ("sdxl", (512, 512), {}, 10, steps(0, 3), steps(0, 7)),
    ("sdxl", (512, 640), {"controlnet": True}, 20, steps(0, 6), steps(0, 14)),
    ("sdxl", (640, 512), {"inpainting": True}, 50, steps(0, 15), steps(0, 35)),
    # sdxl_turbo_1024: no RAD-conv; RAD-pool T1 = 0.5 n at any size
    ("sdxl_turbo", (64, 64), {}, 1, NONE, NONE),
    ("sdxl_turbo", (128, 128), {}, 4, NONE, steps(0, 2)),
    ("sdxl_turbo", (600, 600), {}, 10, NONE, steps(0, 5)),
    ("sdxl_turbo", (128, 128), {"controlnet": True}, 20, NONE, steps(0, 10)),
]


@pytest.mark.parametrize("model_type, size, flags, n, conv_steps, pool_steps", TABLE)
def test_schedule_table(model_type, size, flags, n, conv_steps, pool_steps):
    assert active_steps(model_type, size, n, **flags) == (conv_steps, pool_steps)


@pytest.mark.parametrize("model_type, size, expected", [
    ("sd15", (255, 256), "sd15_1024"), ("sd15", (256, 255), "sd15_1024"), ("sd15", (256, 256), "sd15_2048"),
    ("sdxl", (511, 1024), "sdxl_2048"), ("sdxl", (1024, 511), "sdxl_2048"), ("sdxl", (512, 512), "sdxl_4096"),
    ("sdxl_turbo", (16, 16), "sdxl_turbo_1024"), ("sdxl_turbo", (1024, 1024), "sdxl_turbo_1024"),
])
def test_profile_boundaries(model_type, size, expected):
    assert profile(model_type, *size) == expected


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="model_type"):
        active_ops("sd3", 128, 128, 0, 10)


def test_active_ops_is_a_value():
    assert active_ops("sd15", 64, 64, 0, 10) == ActiveOps(rad_conv=True, rad_pool=False)


@pytest.mark.parametrize("name_or_path, name", [
    ("stabilityai/sdxl-turbo", "sdxl-turbo"),
    ("/home/me/turbo-experiments/sdxl-base", "sdxl-base"),  # a parent folder is not the model's name
    ("/models/SDXL-Turbo/unet", "sdxl-turbo"),
    ("/hf/hub/models--stabilityai--sdxl-turbo/snapshots/0123abcd", "models--stabilityai--sdxl-turbo"),
    ("ckpt/sdxl-turbo/", "sdxl-turbo"),
    ("C:\\models\\Playground-v2.5\\unet", "playground-v2.5"),
    ("", ""),
])
def test_checkpoint_name(name_or_path, name):
    assert schedule.checkpoint_name(name_or_path) == name

