"""Training SAEs on stored activations: deterministic, checkpointed, resumable.

``train_sae(activations, cfg, hook_name)`` trains one SAE on float32 [N, d_in] activations given as one
tensor, a sequence of tensors, a one-shot iterable of tensors, or a callable returning a fresh iterable.
One module per part (defaults in :class:`SAETrainingConfig`, :mod:`.config`):

1. **Data** (:mod:`.data`): validated chunks, shuffled into seeded, replayable batches.
2. **Scaling and initialisation** (:mod:`.init`): inputs are multiplied by ``s = sqrt(d_in) / mean ||x||``
   (``normalize_activations="expected_average_only_in"``, Anthropic April 2024; SAELens
   ``ActivationScaler``) so hyper-parameters transfer between models; decoder rows random unit vectors,
   encoder = decoder transpose (Gao et al. 2024), ``b_enc = 0``, ``b_dec`` = geometric median of the sample.
3. **Loss and gradients** (:mod:`.steps`): ``||x - x̂||²`` summed over dimensions, averaged over the batch,
   plus AuxK (topk), the decoder-norm-weighted L1 (relu) or L0 with straight-through thresholds (jumprelu,
   :mod:`trace_lib.sae.jumprelu`); a dense autograd engine and sparse TopK / ReLU engines, chosen by
   ``(implementation, architecture)``.
4. **Optimiser and schedules** (:mod:`.trainer`, :mod:`.schedule`): Adam (lr 4e-4, betas 0.9/0.999), linear
   warm-up, constant, linear decay to 0 over the last ``lr_decay_fraction`` of steps, global grad-norm clip
   1.0 (SAELens). With ``normalize_decoder`` the decoder-gradient component parallel to each row is removed
   before the step and rows are renormalised after it (sparsify / Gao et al.). With ``target_l0`` a
   dual-ascent controller steers a ReLU SAE's L1 coefficient to that mean L0.
5. **Dead latents**: a latent that has not fired for ``dead_feature_window`` tokens is dead. TopK SAEs feed
   them to AuxK; ReLU SAEs resample them every ``resample_every`` steps (:mod:`.resample`).
6. **Decoder refit** (``refit_decoder``, :mod:`.refit`): least-squares decoder for the trained encoder.
7. **Export** (:mod:`.export`): ``s`` is folded into the weights (``W_enc *= s``, ``W_dec /= s``,
   ``b_dec /= s``, as SAELens does), so the returned SAE works on raw activations.

**Determinism**: batch order comes from a ``torch.Generator`` seeded from ``seed``; weights init and
resampling use their own seeded generators. The same inputs, config and seed give bit-identical weights on
the same device and torch build (checked on CPU; on CUDA cuBLAS may differ run to run unless
``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG`` are set).

**Speed** (``implementation="fast"``, the default): a TopK or ReLU step is dense only in the encoder matmul;
the decoder and the weight gradients work on the selected latents through ``embedding_bag``, and Adam is
fused. ``implementation="reference"`` keeps plain dense autograd as test oracle and benchmark baseline
(``benchmarks/sae_training.py``).

**Checkpoints** (:mod:`.checkpoint`): with ``checkpoint_dir``, every ``checkpoint_every`` steps (and at the
end or at ``max_steps``) the whole state is written atomically to ``checkpoint_dir/checkpoint.safetensors``.
Calling ``train_sae`` again with the same activations, config and ``checkpoint_dir`` resumes: the data
pipeline is replayed (cheap: no SAE maths) to the checkpoint's step and training continues, giving the same
final weights as an uninterrupted run. A finished checkpoint is returned without retraining. A checkpoint
made with another config, width, starting SAE (by :meth:`~trace_lib.sae.SAE.content_hash`), hook or data is
refused.
"""

from __future__ import annotations

from trace_lib.sae.training.checkpoint import CHECKPOINT_FILE
from trace_lib.sae.training.config import IMPLEMENTATIONS, SAETrainingConfig
from trace_lib.sae.training.init import geometric_median
from trace_lib.sae.training.trainer import SAETrainer, train_sae

__all__ = ["CHECKPOINT_FILE", "IMPLEMENTATIONS", "SAETrainer", "SAETrainingConfig", "geometric_median", "train_sae"]
