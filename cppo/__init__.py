"""cppo: Contrastive Perception Policy Optimization for vision-language models.

Subpackages:
    cppo.perturb  information-preserving and information-removing image views (seeded, replayable)
    cppo.detect   the entropy-shift detector of image-dependent response tokens
    cppo.loss     the Contrastive Perception Loss and the GRPO losses, as pure tensor functions
    cppo.rl       a lean GRPO/CPPO training loop

Not to be confused with "Completion Pruning Policy Optimization" (arXiv 2503.22342).
"""

__version__ = "0.1.0"
