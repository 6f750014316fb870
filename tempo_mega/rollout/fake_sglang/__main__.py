"""``python -m tempo_mega.rollout.fake_sglang --model-path DIR --port N``: a fake SGLang server process."""

from tempo_mega.rollout.fake_sglang import main

main()
