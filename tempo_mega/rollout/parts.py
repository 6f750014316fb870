"""A step's sampled rows before tensors: the ragged samples with their texts and scores. The controller
filters the step's parts on these and builds one ``RolloutBatch`` from the rows it keeps."""

from __future__ import annotations

from dataclasses import dataclass

from tempo_mega.batch import RolloutBatch
from tempo_mega.rollout.base import Sample


@dataclass
class SampledPart:
    """One generate call's rows before tensors: the ragged samples with their texts and scores (the
    step's parts are filtered on these and turned into one ``RolloutBatch`` once)."""

    prompt_ids: list[list[int]]
    samples: list[Sample]
    labeled: bool | list[bool]
    group_ids: list[int]
    scores: list[float]
    texts: list[str]
    answers: list[str | None]

    def __len__(self) -> int:
        return len(self.samples)

    def labeled_rows(self) -> list[bool]:
        return list(self.labeled) if isinstance(self.labeled, list) else [self.labeled] * len(self.samples)

    @staticmethod
    def join(parts: list[SampledPart]) -> SampledPart:
        def flat(name: str) -> list:
            return [x for p in parts for x in getattr(p, name)]

        return SampledPart(prompt_ids=flat("prompt_ids"), samples=flat("samples"),
                           labeled=[x for p in parts for x in p.labeled_rows()], group_ids=flat("group_ids"),
                           scores=flat("scores"), texts=flat("texts"), answers=flat("answers"))

    def select(self, rows: list[int]) -> SampledPart:
        lab = self.labeled_rows()
        return SampledPart(prompt_ids=[self.prompt_ids[i] for i in rows], samples=[self.samples[i] for i in rows],
                           labeled=[lab[i] for i in rows], group_ids=[self.group_ids[i] for i in rows],
                           scores=[self.scores[i] for i in rows], texts=[self.texts[i] for i in rows],
                           answers=[self.answers[i] for i in rows])

    def to_batch(self, pad_token_id: int) -> RolloutBatch:
        s = self.samples
        return RolloutBatch.from_samples(
            self.prompt_ids, [x.response_ids for x in s], is_labeled=self.labeled_rows(), group_ids=self.group_ids,
            pad_token_id=pad_token_id, rollout_logprobs=[x.logprobs for x in s], scores=self.scores,
            meta={"text": self.texts, "answer": self.answers, "truncated": [x.finish_reason == "length" for x in s]},
            routed_experts=[x.routed_experts for x in s] if s and s[0].routed_experts is not None else None,
        )
