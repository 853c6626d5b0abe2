"""Triton Python-backend model: CLIP BPE tokenizer.

Copied into `tokenizer/1/model.py` by `orchestrator models build`, next to a `tokenizer/` folder
holding the CLIP tokenizer files. Input `prompt` (TYPE_STRING [1]) per batch row; output
`input_ids` (TYPE_INT64 [L]) padded to L with truncation, and `num_tokens` (TYPE_INT64 [1]),
the untruncated token count, as diffusers' StableDiffusionPipeline
encode_prompt does. All prompts of all requests in one `execute` are tokenized in one call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

try:  # present inside the Triton Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None


def decode_prompts(array: np.ndarray) -> list[str]:
    """Triton string tensor ([batch, 1] of bytes/str) to one prompt per batch row."""
    rows = array.reshape(array.shape[0], -1) if array.ndim > 0 else array.reshape(1, 1)
    prompts = []
    for row in rows:
        value = row[0] if row.size else b""
        prompts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    return prompts


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from transformers import CLIPTokenizer

        config = json.loads(args["model_config"])
        raw_params = config.get("parameters") or {}
        params = {k: str(v.get("string_value", "")) for k, v in raw_params.items()}
        self.model_name = config.get("name", "tokenizer")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = CLIPTokenizer.from_pretrained(str(version_dir / "tokenizer"))
        dims = config["output"][0]["dims"]
        self.max_length = int(params.get("max_length") or dims[-1])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        prompts: list[str] = []
        owners: list[tuple[int, int, int]] = []  # (request index, start, count)
        for index, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "prompt")
                if tensor is None:
                    raise ValueError("missing input 'prompt'")
                batch = decode_prompts(tensor.as_numpy())
            except Exception as exc:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[],
                    error=pb_utils.TritonError(f"{self.model_name}: {exc}"),
                )
                continue
            owners.append((index, len(prompts), len(batch)))
            prompts.extend(batch)
        if not owners:
            return responses
        try:
            ids = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="np",
            ).input_ids.astype(np.int64)
            # the untruncated length (BOS and EOS included): more than L means truncated
            lengths = np.array(
                [[len(x)] for x in self.tokenizer(prompts, truncation=False).input_ids],
                dtype=np.int64,
            )
            for index, start, count in owners:
                piece = np.ascontiguousarray(ids[start : start + count])
                tensor = pb_utils.Tensor("input_ids", piece)
                num = pb_utils.Tensor(
                    "num_tokens", np.ascontiguousarray(lengths[start : start + count])
                )
                responses[index] = pb_utils.InferenceResponse(output_tensors=[tensor, num])
        except Exception as exc:
            for index, _, _ in owners:
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[],
                    error=pb_utils.TritonError(f"{self.model_name}: {type(exc).__name__}: {exc}"),
                )
        return responses

    def finalize(self) -> None:
        self.tokenizer = None
