"""``python -m support.fake_sglang --model-path DIR --port N``: a fake SGLang server process."""

from support.fake_sglang import main

main()
