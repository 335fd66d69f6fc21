"""A small real data set from the `chitchat-dataset` package (MIT; 7,168 human-human chats), in the seed's formats.

chitchat turns are runs of messages by one sender; a turn's messages are joined with newlines. The first
sender plays the user, the second the assistant. Each kind uses its own conversations (no overlap):
  sft         the first `max_turns` turns of a conversation (it must have a reply)
  prompt      a conversation cut before one of its replies (so it ends with a user turn)
  preference  context = a conversation cut before reply k; chosen = reply k itself; rejected = a reply from
              another conversation, picked among replies of similar length (within a factor of 1.5 where
              possible) so that a reward model cannot win on length alone: it has to judge whether the reply
              fits the context. Pairs whose two replies are equal are skipped.
  ptx         a whole conversation as plain text ({"source": "", "Target": text})
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoSizes:
    sft: int = 512
    preference: int = 512
    prompt: int = 256
    ptx: int = 128
    max_turns: int = 8


def chitchat_conversations() -> list[list[str]]:
    """All 7,168 chitchat conversations as lists of turn texts (speakers alternate), in the package's order.
    Empty messages are left out; a conversation may have a single turn (nobody answered)."""
    import chitchat_dataset

    convs = []
    for value in chitchat_dataset.Dataset().values():
        turns = []
        for group in value["messages"]:
            text = "\n".join(m["text"].strip() for m in group if m["text"].strip())
            if text:
                turns.append(text)
        convs.append(turns)
    return convs


def _turns(texts: list[str]) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def sft_record(texts: list[str]) -> dict[str, Any]:
    return {"messages": _turns(texts)}


def demo_records(sizes: DemoSizes = DemoSizes(), seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Raw records of each kind, deterministic for a seed."""
    rng = random.Random(seed)
    convs = [c for c in chitchat_conversations() if len(c) >= 2]  # a reply is needed for every kind
    rng.shuffle(convs)
    n_sft, n_pref, n_prompt = sizes.sft, sizes.preference, sizes.prompt
    if n_sft + n_pref + n_prompt + sizes.ptx > len(convs):
        raise ValueError(f"demo sizes ask for more than the {len(convs)} usable conversations")
    sft_c = convs[:n_sft]
    pref_c = convs[n_sft : n_sft + n_pref]
    prompt_c = convs[n_sft + n_pref : n_sft + n_pref + n_prompt]
    ptx_c = convs[n_sft + n_pref + n_prompt : n_sft + n_pref + n_prompt + sizes.ptx]
    mt = sizes.max_turns

    sft = [sft_record(c[:mt]) for c in sft_c]

    prompts = []
    for c in prompt_c:
        k = rng.randrange(1, min(len(c), mt) + 1, 2)  # an odd number of turns: ends with the user
        prompts.append({"messages": _turns(c[:k])})

    # Rejected replies come from the SFT/prompt conversations' replies, never from the pair's own conversation.
    pool = sorted({t for c in sft_c + prompt_c for t in c[1::2]}, key=len)
    lengths = [len(t) for t in pool]
    prefs = []
    for c in pref_c:
        k = rng.randrange(1, min(len(c), mt), 2)  # c[k] is a reply (every conversation here has one)
        chosen = c[k]
        rejected = _similar_length(pool, lengths, len(chosen), rng)
        if rejected == chosen:
            continue
        prefs.append({
            "context": _turns(c[:k]),
            "chosen": [{"from": "assistant", "content": chosen}],
            "rejected": [{"from": "assistant", "content": rejected}],
        })

    ptx = [{"source": "", "Target": "\n".join(c[:mt])} for c in ptx_c]
    return {"sft": sft, "preference": prefs, "prompt": prompts, "ptx": ptx}


def _similar_length(pool: list[str], lengths: list[int], n: int, rng: random.Random) -> str:
    import bisect

    lo = bisect.bisect_left(lengths, n / 1.5)
    hi = bisect.bisect_right(lengths, n * 1.5)
    if hi - lo < 8:  # too few of similar length: widen around the nearest ones
        mid = bisect.bisect_left(lengths, n)
        lo, hi = max(0, mid - 16), min(len(pool), mid + 16)
    return pool[rng.randrange(lo, hi)]


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


def write_demo(out: str | Path, sizes: DemoSizes = DemoSizes(), seed: int = 0) -> dict[str, Path]:
    """Write OUT/<kind>.jsonl for each kind; returns the paths."""
    recs = demo_records(sizes, seed)
    return {kind: write_jsonl(rows, Path(out) / f"{kind}.jsonl") for kind, rows in recs.items()}
