"""The built-in UNets: build_unet's fast build gives the weights of a plain build seeded by seed_weights."""
import torch
from diffusers import UNet2DConditionModel

from hidiff_models.configs import build_unet, seed_weights, unet_config


def test_fast_build_gives_the_seeded_weights():
    """Meta-device construction and seeding in threads (build_unet) change nothing in the weights."""
    for model in ("sd15", "sd21", "sdxl"):
        expected = seed_weights(UNet2DConditionModel(**unet_config(model, "tiny")), 3).state_dict()
        built = build_unet(model, "tiny", seed=3).state_dict()
        assert built.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(built[name], tensor), name
