"""What the training loop does around each step besides training, as Megatron-LM's loop does:
manual garbage collection (--manual-gc), releasing cached device memory
(--empty-unused-memory-level) and profiling (--profile, nsys or the PyTorch profiler)."""

from __future__ import annotations

import contextlib
import gc
from typing import Optional

import torch

from megatron_sip.log import rank
from megatron_sip.training.metrics import LoggingConfig


class StepHousekeeping:
    """The loop enters it for the whole run (leaving re-enables the garbage collector and stops
    a profiler still running, on every way out), calls :meth:`before_step` / :meth:`after_step`
    around each step and runs evaluations inside :meth:`evaluation`."""

    def __init__(self, config: LoggingConfig):
        self.config = config
        self.profiler: Optional[torch.profiler.profile] = None
        self.nvtx = None
        self.profiling_rank = config.profile and rank() in config.profile_ranks
        self.gc_was_enabled = gc.isenabled()

    def __enter__(self) -> StepHousekeeping:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.config.manual_gc:
            # As Megatron-LM: no threshold-triggered collections in the middle of a step, so
            # that every rank collects at the same points.
            gc.disable()
            gc.collect()
        if self.profiling_rank and self.config.use_pytorch_profiler:
            start, end = self.config.profile_step_start, self.config.profile_step_end
            # Megatron-LM's schedule: the loop calls step() at the start of every iteration.
            self.profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(
                    wait=max(start - 1, 0),
                    warmup=1 if start > 0 else 0,
                    active=end - start,
                    repeat=1,
                ),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(
                    self.config.tensorboard_dir
                ),
                record_shapes=True,
                with_stack=True,
            )
            self.profiler.start()

    def before_step(self, iteration: int) -> None:
        """``iteration``: steps done so far."""
        if not self.profiling_rank:
            return
        if self.profiler is not None:
            self.profiler.step()
        elif iteration == self.config.profile_step_start:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.nvtx.__enter__()

    def after_step(self, iteration: int) -> None:
        """``iteration``: steps done, this one included."""
        if self.config.empty_unused_memory_level >= 1:
            torch.cuda.empty_cache()
        if self.profiling_rank and iteration == self.config.profile_step_end:
            self._stop_profiler()
        interval = self.config.manual_gc_interval
        if self.config.manual_gc and interval and iteration % interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self):
        if self.config.manual_gc and self.config.manual_gc_eval:
            gc.collect()
        yield
        if self.config.empty_unused_memory_level >= 1:
            torch.cuda.empty_cache()
        if self.config.manual_gc and self.config.manual_gc_eval:
            # Only what evaluation made and dropped (Megatron-LM collects generation 0 here).
            gc.collect(generation=0)

    def close(self) -> None:
        self._stop_profiler()
        if self.config.manual_gc and self.gc_was_enabled:
            gc.enable()

    def _stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.nvtx is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            self.nvtx.__exit__(None, None, None)
            self.nvtx = None
