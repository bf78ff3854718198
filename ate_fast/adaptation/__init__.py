"""The adaptation pipeline's shared steps: what ``ate-fast demo`` and the Meta-World
benchmark (``ate-fast eval metaworld``) both do to adapt a pre-trained chunk policy to a
new robot.

* :mod:`.chunks` — demonstrations cut into ``(observation, action chunk)`` pairs, and the
  ``(chunk, mask)`` dataset ``ate_fast.align``'s trainers take;
* :mod:`.settings` — :class:`AlignSettings`, the align step's sizes (no heavy imports, so a
  CLI can build its configs cheaply);
* :mod:`.align_step` — ATE Align: the stage-1 VAE and its latent prior on the source
  robot's chunks, the stage-2 VAE on the target robot's, and the mean stage-2 latent;
* :mod:`.objectives` — flow matching (also with training-time RTC) and ε-prediction
  diffusion, each plain or with the
  ATE Steer loss;
* :mod:`.policy_training` — the training loop both pre-training and fine-tuning (direct
  or Steer) run.

What differs between the two — environments, embodiments, policies' conditioning,
evaluation, caching — stays with them. Nothing here imports ``ate_fast.demo`` or
``ate_fast.eval``. Names import on first access.
"""

from __future__ import annotations

from ate_fast.lazy_exports import lazy_attributes

_EXPORTS = {
    "ChunkData": "chunks",
    "MaskedChunks": "chunks",
    "chunk_windows": "chunks",
    "AlignSettings": "settings",
    "SourceAlignment": "align_step",
    "TargetAlignment": "align_step",
    "align_source": "align_step",
    "align_target": "align_step",
    "new_chunk_vae": "align_step",
    "TIME_BETA_A": "objectives",
    "EpsilonDiffusion": "objectives",
    "FlowMatching": "objectives",
    "RTCFlowMatching": "objectives",
    "Objective": "objectives",
    "PolicyFit": "policy_training",
    "train_chunk_policy": "policy_training",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attributes(
    globals(), {name: f"ate_fast.adaptation.{module}" for name, module in _EXPORTS.items()}
)
