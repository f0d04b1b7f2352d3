"""Capturing activations: hooks and the inputs they run on."""

from trace_lib.capture.hooks import CapturedBatch, HookConfig, HookManager, iter_activations

__all__ = ["CapturedBatch", "HookConfig", "HookManager", "iter_activations"]
