"""Stage 2, SelfControl: suffix scores, suffix gradients, controls and the search that combines them.

``tasks`` (a behaviour as a self-judgement question and prompts), ``suffix``
(score and gradient of the model judging its own answer), ``control`` (per-hook
additions at prompt positions), ``fluency`` (is an answer still text) and
``search`` (SelfControl's iterated step-size search). Training-free and per
prompt: the core of the method. May import: ``model`` and shared ground.
"""
