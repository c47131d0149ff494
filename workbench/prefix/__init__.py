"""Stage 3, the Prefix Controller: SelfControl compressed into a few trained virtual tokens.

``synthesis`` runs the search over many prompts and stores the controlled
hidden states (resumable); ``controller`` is the trained prefix and how it is
applied; ``training`` fits it to the synthesised states. May import:
``selfcontrol``, ``model`` and shared ground (not ``analysis``, its sibling).
"""
