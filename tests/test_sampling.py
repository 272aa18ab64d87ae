"""Batched generation decodes one image at a time (the full-size batch decode is set-up's memory
peak on a GPU) and gives the same pixels as a batch decode."""

from __future__ import annotations

import contextlib

import numpy as np

from rewardbooth import sampling
from rewardbooth.models.loading import load_components, make_pipeline
from rewardbooth.sampling import SampleSettings, generate


def test_generation_decodes_one_image_at_a_time_with_the_same_pixels(monkeypatch):
    pipe = make_pipeline(load_components("tiny"))
    settings = SampleSettings(steps=2, batch_size=3, seed=5)
    decoded_batches = []
    decode = pipe.vae._decode
    monkeypatch.setattr(pipe.vae, "_decode", lambda z, *a, **k: (decoded_batches.append(len(z)), decode(z, *a, **k))[1])
    sliced = generate(pipe, ["a photo of a toy", "a toy on the beach"], 3, settings)
    assert decoded_batches == [1] * 6 and not pipe.vae.use_slicing  # sliced, and the VAE left as it was found

    decoded_batches.clear()
    monkeypatch.setattr(sampling, "_sliced_decoding", lambda vae: contextlib.nullcontext())
    whole = generate(pipe, ["a photo of a toy", "a toy on the beach"], 3, settings)
    assert decoded_batches == [3, 3]
    for row_sliced, row_whole in zip(sliced, whole):
        for a, b in zip(row_sliced, row_whole):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
