"""Stage 3, analyses: where and how a control acts.

``norms`` (norm patterns per layer), ``directions`` (PCA of suffix-gradient
directions and trajectories), ``repe`` (RepE reading vectors and their cosine
with suffix gradients), ``ablation`` (layer windows, question wordings) and
``control_cache`` (found controls on disk, so no study searches twice). May
import: ``selfcontrol``, ``model`` and shared ground (not ``prefix``, its sibling).
"""
