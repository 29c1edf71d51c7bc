"""Our own denoising loop around a Stable Diffusion pipeline's components, with no wasted work.

It makes the images ``StableDiffusionPipeline.__call__`` makes for the same seeds (bitwise, on CPU;
tests/test_fast_loop.py checks every recipe), and skips what that call repeats:

- classifier-free guidance only when it applies (``guidance > 1`` and a UNet without guidance
  embedding), exactly as the pipeline decides; otherwise no unconditional batch at all;
- the text encoder sees each distinct caption of a batch once, and the empty (unconditional)
  caption once per batch instead of once per caption; rows are gathered to the B*m images;
- decoding, resizing to ``save_size``, uint8 conversion and the copy to the host of batch k run in
  a finisher thread while batch k+1 is denoised (`Finisher`). On CUDA the finisher works on its own
  stream: it waits on an event recorded after batch k's last step, the latents are marked as used
  by that stream (``record_stream``), and the uint8 result is copied into pinned host memory and
  synchronized there before it is handed on. On CPU both threads share the cores; the overlap
  hides the Python and dispatch time of each side behind the other.

- the VAE decodes ``decode_slice`` images at a time (default `DECODE_SLICE`): the whole batch at
  once needs about 0.5 GiB per 512-px image in fp16, 40 GiB for 8 captions x 10 images. An
  out-of-memory error inside decode halves the slice and retries the rest of the batch (down to
  one image; the smaller slice is kept for later batches), as one in denoising halves the batch.
  With a compiled decoder the last slice is padded to the slice size (one shape, no recompile).

Shapes: B captions, m images each, N = B*m; latents [N, C, H/f, W/f] (f = pipe.vae_scale_factor);
text embeddings [N, 77, D] ([2N, 77, D] with guidance, unconditional rows first).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from generator_service.backends.uint8_images import to_uint8_hwc

log = logging.getLogger(__name__)

#: images per VAE decode call (SD v1.5 at 512 px in fp16: about 4 GiB of activations)
DECODE_SLICE = 8


def supports_own_loop(pipe) -> bool:
    """Whether ``pipe`` is a plain StableDiffusionPipeline (whose __call__ this loop reproduces)."""
    return type(pipe).__name__ == "StableDiffusionPipeline" and all(
        hasattr(pipe, name) for name in ("encode_prompt", "prepare_latents", "prepare_extra_step_kwargs", "unet", "vae")
    )


class SDLoop:
    """``denoise(captions, seeds) -> latents`` and ``decode(latents) -> uint8 [N, S, S, 3]`` for one pipeline."""

    def __init__(self, pipe, config, device) -> None:
        import torch

        self.torch = torch
        self.pipe = pipe
        self.config = config
        self.device = device
        self.decode_slice = DECODE_SLICE  # halved for good after an out-of-memory error in decode

    @property
    def guided(self) -> bool:
        """The pipeline's own rule (``do_classifier_free_guidance``)."""
        return self.config.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    def text_embeddings(self, captions: list[str], m: int):
        """[N, 77, D] (or [2N, 77, D], unconditional first): each distinct caption encoded once."""
        torch, pipe = self.torch, self.pipe
        unique = list(dict.fromkeys(captions))
        embeds, _ = pipe.encode_prompt(unique, self.device, 1, False)
        rows = torch.tensor([unique.index(c) for c in captions], device=embeds.device).repeat_interleave(m)
        embeds = embeds.index_select(0, rows)
        if not self.guided:
            return embeds
        empty, _ = pipe.encode_prompt([""], self.device, 1, False)
        return torch.cat([empty.expand(len(rows), -1, -1), embeds])

    def denoise(self, captions: list[str], seeds: list[list[int]]):
        """Latents [N, C, h, w] after the last step; noise from one CPU generator per image."""
        torch, pipe, config = self.torch, self.pipe, self.config
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        m = len(seeds[0])
        n = len(captions) * m
        generators = [torch.Generator("cpu").manual_seed(seed) for group in seeds for seed in group]
        pipe._guidance_scale = config.guidance  # read by pipeline helpers (guidance embedding)
        embeds = self.text_embeddings(captions, m)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, config.steps, self.device)
        latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, config.height, config.width, embeds.dtype,
                                       self.device, generators)
        extra = pipe.prepare_extra_step_kwargs(generators, config.eta)
        timestep_cond = None
        if pipe.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(config.guidance - 1).repeat(n)
            timestep_cond = pipe.get_guidance_scale_embedding(
                scale, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=self.device, dtype=latents.dtype)
        scheduler, guided = pipe.scheduler, self.guided
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = pipe.unet(model_input, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond,
                              return_dict=False)[0]
            if guided:
                uncond, text = noise.chunk(2)
                noise = uncond + config.guidance * (text - uncond)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        return latents

    def decode(self, latents):
        """uint8 [N, S, S, 3] on the device: VAE decode in slices, [-1, 1] -> [0, 1], resize, round."""
        torch = self.torch
        n, parts, start = latents.shape[0], [], 0
        while start < n:
            size = min(self.decode_slice, n - start)
            try:
                parts.append(self._decode_slice(latents[start:start + size]))
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                self.decode_slice = max(1, size // 2)
                log.warning("out of memory decoding %d images at once; decoding %d at a time", size, self.decode_slice)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            start += size
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_slice(self, latents):
        """uint8 [k, S, S, 3] for latents [k, C, h, w]; a compiled decoder always sees ``decode_slice`` rows."""
        vae, k = self.pipe.vae, latents.shape[0]
        if self.config.compile and k < self.decode_slice:  # pad with copies of the last row: one static shape
            latents = self.torch.cat([latents, latents[-1:].expand(self.decode_slice - k, *latents.shape[1:])])
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0][:k]
        images = (images / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize, as postprocess does
        return to_uint8_hwc(images, self.config.save_size, self.device)


class Finisher:
    """Runs ``finish(latents) -> uint8 numpy`` for one batch at a time in a thread (a CUDA stream on GPU).

    ``submit`` returns at once; it first waits for the previous batch's finish, so at most one
    batch is decoded while the next is denoised (memory: two batches of latents, one of images).
    ``done(images)`` or ``failed(exc)`` is called in the finisher thread, in submission order.
    """

    def __init__(self, decode: Callable, device) -> None:
        import torch

        self.torch = torch
        self.decode = decode
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._idle = threading.Event()
        self._idle.set()
        self._job: tuple | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="generator-finisher", daemon=True)
        self._thread.start()

    def submit(self, latents, shape: tuple[int, ...], done: Callable[[np.ndarray], None],
               failed: Callable[[BaseException], None]) -> None:
        ready = None
        if self.cuda:
            ready = self.torch.cuda.Event()
            ready.record()  # after the last denoising kernel of this batch, on the caller's stream
        self.wait()
        with self._wake:
            self._idle.clear()
            self._job = (latents, ready, shape, done, failed)
            self._wake.notify()

    def wait(self) -> None:
        """Until the batch handed over last is finished (its callback has returned)."""
        self._idle.wait()

    def close(self) -> None:
        self.wait()
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._job is None and not self._closed:
                    self._wake.wait()
                if self._job is None:
                    return
                job, self._job = self._job, None
            latents, ready, shape, done, failed = job
            try:
                done(self._finish(latents, ready).reshape(shape))
            except BaseException as exc:  # handed to the caller's failure path
                failed(exc)
            finally:
                self._idle.set()

    def _finish(self, latents, ready) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            if not self.cuda:
                return self.decode(latents).numpy()
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                latents.record_stream(self.stream)  # its memory is not reused before this stream is done
                images = self.decode(latents)
                host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(images, non_blocking=True)
                self.stream.synchronize()
            return host.numpy()
