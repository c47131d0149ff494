"""Stage 4, evaluation: compare control methods on held-out prompts with judges the model cannot steer.

``methods`` (none, prompt, repe, selfcontrol, prefix behind one interface),
``runner`` (the resumable run over tasks x methods x prompts), ``report``
(statistics, Markdown, CSV, figure), ``judges`` (lexicon and sentiment judges
independent of the model) and ``judge_check`` (does the self-judge separate
good from bad answers at all). May import every stage below: ``analysis``,
``prefix``, ``selfcontrol``, ``model``, and shared ground.
"""
