"""Stage 1, the model: load a chat LM behind TransformerLens hooks and generate from it in token ids.

``loading`` turns a name (the embedded SmolLM2, ``tiny-random``, a hub id, a
local folder) into a :class:`~workbench.model.chat_model.HookedChatModel`;
``chat_model`` holds the bridge, the tokenizer, sizes and chat formatting;
``generation`` runs batched, cached generation with every hook active in the
prefill; ``families`` describes each architecture family (config class, chat
template, special tokens) and writes random-weight model folders of any of
them, for the architecture tests and benchmarks. Everything above builds on these. May import: shared ground only
(``errors``, ``store``, ``plotting``).
"""
