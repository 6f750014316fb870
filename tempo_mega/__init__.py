"""tempo-mega: test-time training of reasoning LLMs as expectation-maximization (TEMPO).

Importing this package pulls no CUDA library: heavy engines (megatron.core, transformer_engine,
sglang, triton, pynvml, wandb) are imported only by the modules that need them.
"""

__version__ = "0.1.0"
