"""Exchanges (a questioner's line -> the responder's reply) from the plays and from chitchat, selected and split.

The paper's MQDialog pairs one responder with many questioners; we build the same shape offline. An exchange is two
consecutive speeches (plays: same scene) or turns (chitchat: same conversation) by different people: the first is the
question, the second the reply. A responder is kept when at least ``min_questioners`` questioners each have
``min_pair`` exchanges with them; the ``responders`` responders with most such exchanges are kept. The split is
per (responder, questioner) pair, so every held-out pair was seen in training, and fixed by ``data_seed`` (training
seeds change the model, never the held-out set, so arms and seeds are compared on the same exchanges).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field, replace

from edgecloud.errors import UserError

CORPORA = ("plays", "chat")


@dataclass(frozen=True)
class Exchange:
    responder: str  # display name, e.g. "Hamlet (hamlet)" or "user 095cd7"
    questioner: str
    question: str
    reply: str
    pair: int = -1  # index of (responder, questioner) in Dataset.pairs
    cluster: int = -1  # global cluster id (set by clusters.assign)


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "plays"
    responders: int = 12
    min_questioners: int = 3
    min_pair: int = 12  # exchanges a questioner needs with a responder to count
    max_questioners: int = 8  # per responder, those with most exchanges (chitchat's prolific senders have hundreds)
    q_words: int = 16  # the question keeps its last words (what the reply answers)
    r_words: int = 12  # the reply keeps its first words (about 16 tokens: what greedy generation can reach)
    heldout_frac: float = 0.2
    max_train: int = 320
    max_eval: int = 100
    data_seed: int = 0

    def __post_init__(self):
        if self.corpus not in CORPORA:
            raise UserError(f"--corpus {self.corpus!r}: choose one of {', '.join(CORPORA)}")
        if self.responders < 1 or self.min_questioners < 2 or self.min_pair < 2:
            raise UserError("data config: responders >= 1, min_questioners >= 2 and min_pair >= 2 are needed")
        if not 0 < self.heldout_frac < 1:
            raise UserError(f"heldout_frac {self.heldout_frac}: must be between 0 and 1")


@dataclass
class Dataset:
    config: DataConfig
    train: list[Exchange]
    heldout: list[Exchange]
    pairs: list[tuple[str, str]]  # (responder, questioner) by pair index
    responders: list[str] = field(default_factory=list)

    def questioners_of(self, responder: str) -> list[str]:
        return sorted({q for r, q in self.pairs if r == responder})

    def counts(self) -> dict:
        return {"responders": len(self.responders), "questioners": len({q for _, q in self.pairs}),
                "pairs": len(self.pairs), "train_exchanges": len(self.train), "heldout_exchanges": len(self.heldout)}


def short_name(name: str) -> str:
    """The name as a person would say it: "Hamlet (hamlet)" -> "Hamlet" (the play only disambiguates ids)."""
    return name.split(" (")[0]


def system_line(responder: str, questioner: str | None) -> str:
    """The system prompt: who answers, and (name-in-prompt arms) who asks. Short: every token costs training time."""
    who = f" {short_name(questioner)} speaks to you." if questioner else ""
    return f"You are {short_name(responder)}.{who} Reply briefly."


def prompt_text(e: Exchange, named: bool) -> str:
    from edgecloud.llm.prompts import chat_prompt

    return chat_prompt(system_line(e.responder, e.questioner if named else None), e.question)


def _clip(text: str, n: int, last: bool) -> str:
    w = text.split()
    return " ".join(w[-n:] if last else w[:n])


def _play_name(speaker: str, play: str) -> str:
    return f"{speaker.title()} ({play})"


def raw_exchanges(corpus: str, cfg: DataConfig) -> list[Exchange]:
    """Every exchange of a corpus, in corpus order."""
    out = []
    if corpus == "plays":
        from edgecloud.personal.qar.plays import load_speeches

        sp = load_speeches()
        for a, b in zip(sp, sp[1:], strict=False):
            if a.play == b.play and a.scene == b.scene and a.speaker != b.speaker:
                out.append(Exchange(_play_name(b.speaker, b.play), _play_name(a.speaker, a.play),
                                    _clip(a.text, cfg.q_words, True), _clip(b.text, cfg.r_words, False)))
    else:
        from edgecloud.personal.chitchat import load_conversations

        for conv in load_conversations():
            for a, b in zip(conv, conv[1:], strict=False):
                if a.sender != b.sender:
                    out.append(Exchange(f"user {b.sender[:6]}", f"user {a.sender[:6]}",
                                        _clip(a.text, cfg.q_words, True), _clip(b.text, cfg.r_words, False)))
    return out


def _sample(items: list, n: int, rng: random.Random) -> list:
    return items if len(items) <= n else rng.sample(items, n)


def build(cfg: DataConfig) -> Dataset:
    """Select responders and pairs, split each pair into train / held-out, cap both sets (stratified by pair)."""
    by_pair: dict[tuple[str, str], list[Exchange]] = defaultdict(list)
    for e in raw_exchanges(cfg.corpus, cfg):
        by_pair[(e.responder, e.questioner)].append(e)
    good = {p: v for p, v in by_pair.items() if len(v) >= cfg.min_pair}
    per_resp: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for p in sorted(good, key=lambda p: (-len(good[p]), p)):
        if len(per_resp[p[0]]) < cfg.max_questioners:
            per_resp[p[0]].append(p)
    eligible = [r for r, ps in per_resp.items() if len(ps) >= cfg.min_questioners]
    eligible.sort(key=lambda r: (-sum(len(good[p]) for p in per_resp[r]), r))
    responders = sorted(eligible[:cfg.responders])
    if not responders:
        raise UserError(f"{cfg.corpus}: no responder has {cfg.min_questioners} questioners with {cfg.min_pair} "
                        "exchanges each; lower --min-pair or --min-questioners")
    pairs = sorted(p for r in responders for p in per_resp[r])
    index = {p: i for i, p in enumerate(pairs)}
    rng = random.Random(cfg.data_seed)
    train, held = [], []
    for p in pairs:
        ex = [replace(e, pair=index[p]) for e in good[p]]
        rng.shuffle(ex)
        k = max(1, round(cfg.heldout_frac * len(ex)))
        held.append(ex[:k])
        train.append(ex[k:])
    # caps: one exchange of every pair first (so each pair stays represented), the rest uniformly at random
    def cap(groups: list[list[Exchange]], n: int) -> list[Exchange]:
        flat = [e for g in groups for e in g]
        if len(flat) <= n:
            return flat
        first = [g[0] for g in groups if g][:n]
        rest = [e for g in groups for e in g[1:]]
        return first + _sample(rest, n - len(first), rng)

    return Dataset(cfg, cap(train, cfg.max_train), cap(held, cfg.max_eval), [tuple(p) for p in pairs], responders)
