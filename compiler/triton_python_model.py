"""Triton python-backend model for an iia artifact (copied as `<model>/<version>/model.py` by iia-export-triton).

Imports only numpy, iia.runtime and triton_python_backend_utils: the server's Python environment needs
numpy, onnxruntime (or onnxruntime-gpu / tensorrt) and iia (no torch). The artifact sits beside this file in
`artifact/` (config parameter "artifact") and is loaded with `iia.runtime.load`, which checks every sha256;
config parameter "threads" (optional) sets ONNX Runtime's intra-op threads of each instance.

Per request (all tensors carry the batch axis B):
  noise         FP32  [B, *sample_shape]   standard-normal noise; OR
  seed          INT64 [B, 1]               one seed per image: image i's noise is iia.runtime.draw_noise(seed_i, 1),
                                           so seeds s, s+1, ..., s+B-1 give exactly the noise of
                                           sampler(seed=s, batch_size=B) in process (EDM's per-image seeds)
  class_labels  INT64 [B, 1]               class ids (conditional models only)
  guidance      FP32  [B, 1]               one guidance scale per image (artifacts compiled for a guidance range
                                           only; optional: absent gives every image the manifest's default)
-> images FP32 [B, *sample_shape] (latents for latent models), images_uint8 UINT8 [B, H, W, C] (image models).

Dynamic batching hands `execute` several requests at once (each with its own guidance scales): each is validated
on its own (a bad one gets its
own error response, naming the problem, with status INVALID_ARG, i.e. HTTP 400 / gRPC INVALID_ARGUMENT, and
the others are served), then the valid ones run as ONE sampler
call on their concatenated noise, and the outputs are split back. The graph treats images independently, so
a request's outputs do not depend on what it was batched with beyond float rounding of batched kernels.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

import iia.runtime
from iia.runtime.contract import GUIDANCE, IMAGES_U8, LABELS, MAX_SEED, NOISE, ORT_CPU


def _bad_request(message):
    """A client's mistake: INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT) where this backend has status codes
    (Triton >= 23.x python backend), else the plain TritonError (INTERNAL)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v.get("string_value") for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        artifact = params.get("artifact") or "artifact"
        threads = int(params["threads"]) if params.get("threads") else None
        root = Path(__file__).resolve().parent / artifact
        if args.get("model_instance_kind") == "GPU":
            backend, device_id = "auto", int(args.get("model_instance_device_id") or 0)
        else:
            backend, device_id = ORT_CPU, 0
        self.sampler = iia.runtime.load(root, backend, threads=threads, device_id=device_id)
        pb_utils.Logger.log_info(f"iia: {self.sampler!r} ({iia.runtime.describe(self.sampler)})")

    def _prepare(self, request):
        """(noise float32 [B, ...], labels int64 [B] | None, guidance float32 [B] | None) for one request, or
        ValueError naming the problem."""
        noise, seed, labels = _input(request, NOISE), _input(request, "seed"), _input(request, LABELS)
        if noise is not None and seed is not None:
            raise ValueError("give either noise or seed, not both")
        if noise is None and seed is None:
            raise ValueError(f"give noise (FP32 [B, {', '.join(map(str, self.sampler.sample_shape))}]) or seed "
                             f"(INT64 [B, 1], one per image)")
        if seed is not None:
            seeds = seed.reshape(-1)
            if seeds.size != seed.shape[0]:
                raise ValueError(f"seed must have shape [B, 1], got {list(seed.shape)}")
            bad = (seeds < 0) | (seeds > MAX_SEED)  # iia-sample's --seed bounds; one message for the whole request
            if bad.any():
                raise ValueError(f"seeds must lie in [0, {MAX_SEED}], got {int(seeds[bad][0])}")
            noise = np.concatenate([iia.runtime.draw_noise(int(s), 1, self.sampler.sample_shape) for s in seeds])
        noise = self.sampler.check_noise(noise)
        if labels is None and self.sampler.conditional:  # the runtime's message offers one-hot, which [B, 1] cannot carry
            raise ValueError(f"this model is class-conditional: give class_labels (INT64 [B, 1], one id in "
                             f"[0, {self.sampler.label_dim - 1}] per image)")
        if labels is not None:
            labels = labels.reshape(labels.shape[0], -1)
            if labels.shape[1] != 1:
                raise ValueError(f"class_labels must have shape [B, 1] (one id per image), got {list(labels.shape)}")
            labels = labels[:, 0]
        guidance = _input(request, GUIDANCE)  # optional: None gives the manifest's default to each image
        if guidance is not None:
            guidance = guidance.reshape(guidance.shape[0], -1) if guidance.ndim else guidance.reshape(1, 1)
            if guidance.shape[1] != 1:
                raise ValueError(f"guidance must have shape [B, 1] (one scale per image), got {list(guidance.shape)}")
            guidance = guidance[:, 0]
        batch = noise.shape[0]
        return noise, self.sampler.check_labels(labels, batch), self.sampler.check_guidance(guidance, batch)

    def execute(self, requests):
        responses = [None] * len(requests)
        batch = []  # (index, noise, labels, guidance) of the valid requests
        for i, request in enumerate(requests):
            try:
                noise, labels, guidance = self._prepare(request)
            except ValueError as err:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=_bad_request(str(err)))
                continue
            batch.append((i, noise, labels, guidance))
        if batch:
            noise = np.concatenate([b[1] for b in batch])
            labels = None if batch[0][2] is None else np.concatenate([b[2] for b in batch])
            # each request's own scales (checked above), side by side in the one call
            guidance = None if batch[0][3] is None else np.concatenate([b[3] for b in batch])
            try:
                out = self.sampler.sample(noise, class_labels=labels, guidance=guidance)
            except Exception as err:  # a backend failure: every request of this batch gets it, one line
                for i, *_ in batch:
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(f"iia sampler failed: {type(err).__name__}: {err}"))
                return responses
            start = 0
            for i, x, *_ in batch:
                stop = start + x.shape[0]
                # `images`, or `latents` for a latent model (out.images holds the graph's float samples)
                tensors = [pb_utils.Tensor(self.sampler.samples_name, np.ascontiguousarray(out.images[start:stop]))]
                if out.images_uint8 is not None:
                    tensors.append(pb_utils.Tensor(IMAGES_U8, np.ascontiguousarray(out.images_uint8[start:stop])))
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start = stop
        return responses

    def finalize(self):
        self.sampler.close()
