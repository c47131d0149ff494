"""Stage 3, preference learning: SelfControl as a data generator, its answers training the model itself.

``data`` makes the pairs (SelfControl's answer, or the instructed one, over the plain answer);
``pairs`` is the dataset format (TRL's conversational preference format as JSON lines:
``prompt`` a list of chat messages, ``chosen`` and ``rejected`` one assistant message each);
``dpo`` trains a model on such pairs with TRL's ``DPOTrainer`` and saves it as a plain model
folder that :func:`~workbench.model.loading.load_model` loads. May import: ``selfcontrol``,
``model`` and shared ground (not ``prefix`` or ``analysis``, its siblings).
"""
