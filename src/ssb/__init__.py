"""ssb: Semantic Soft Bootstrapping (arXiv 2512.05105).

Teach a language model to reason through math problems without reinforcement learning, by
distilling the model's own hinted solutions into a hint-free LoRA student.
"""

__version__ = "0.1.0"
