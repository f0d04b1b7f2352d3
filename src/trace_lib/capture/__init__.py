"""Capturing activations: hooks, the inputs they run on, and the registry of every hook trace installs."""

from trace_lib.capture.hooks import CapturedBatch, HookConfig, HookManager, iter_activations
from trace_lib.capture.registry import HookRecord, installed_hooks, remove_hooks

__all__ = ["CapturedBatch", "HookConfig", "HookManager", "HookRecord", "installed_hooks", "iter_activations",
           "remove_hooks"]
