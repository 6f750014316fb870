"""Test support shared by the suite: imported as ``support.<module>`` (``tests/`` is on ``sys.path``
through ``[tool.pytest.ini_options] pythonpath`` in pytest, and through ``PYTHONPATH``, which
``tests/conftest.py`` sets, in the processes tests start).

- ``models``: the one tiny Qwen3 builder, shaped by ``configs/model/tiny.yaml``.
- ``net``: free TCP ports.
- ``runs``: reading what a run wrote (``metrics.jsonl``).
- ``megatron_cpu``: megatron-core on the CPU (gloo), and a one-process torchrun world.
- ``sglang``: the fake SGLang server fixtures and the client settings the SGLang tests share.
"""
