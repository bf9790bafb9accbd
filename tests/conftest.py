"""pytest setup: the repository root on sys.path, and session-wide tiny models.

The session fixtures are shared by every test: never modify them (no weight edits, no hooks left behind);
build a private copy with `tests.fixtures.models.tiny_sd15_unet(seed)` when a test must change a model.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.fixtures import models  # noqa: E402


@pytest.fixture(scope="session")
def sd15_unet():
    """Shared SD1.5-layout tiny UNet (seed 0). Read-only."""
    return models.tiny_sd15_unet(0)


@pytest.fixture(scope="session")
def sdxl_unet():
    """Shared SDXL-layout tiny UNet (seed 0). Read-only."""
    return models.tiny_sdxl_unet(0)


@pytest.fixture(scope="session")
def sd15_text_encoder():
    """Shared SD1.5 tiny text encoder (CLIPTextModel, seed 0). Read-only."""
    return models.tiny_sd15_text_encoder(0)


@pytest.fixture(scope="session")
def sdxl_text_encoders():
    """Shared SDXL tiny text encoders (TE1 CLIPTextModel, TE2 CLIPTextModelWithProjection). Read-only."""
    return models.tiny_sdxl_text_encoders(0)
