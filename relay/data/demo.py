"""A small real data set from the `chitchat-dataset` package (MIT; 7,168 human-human chats), in the seed's formats,
with held-out splits drawn from conversations the training splits never see.

chitchat turns are runs of messages by one sender; a turn's messages are joined with newlines. The first
sender plays the user, the second the assistant. Each kind uses its own conversations (no overlap, and none
between a kind's train and held-out split):
  sft         the first `max_turns` turns of a conversation (it must have a reply)
  prompt      the turns before one of a conversation's replies (at most `context_turns`; ends with the user)
  preference  context = the turns before reply k (at most `context_turns`); chosen = reply k as the person wrote
              it; rejected = the same reply with its words shuffled ("garbled": same words, same length, only
              their order, i.e. whether it reads as language, differs) or, with `rejected="mixed"`, half of the
              time a reply from another conversation of similar length ("off-topic": it has to fit the
              context). Neither length nor any token tells the two apart: the preference is a property of
              the text.
  ptx         a whole conversation as plain text ({"source": "", "Target": text})
Every kind also gets a `<kind>_heldout` split for evaluation. Deterministic for a seed: the same seed writes
byte-identical files in any process (ties are broken by content, never by hash order).
"""
from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REJECTED_STYLES = ("garbled", "off-topic", "mixed")


@dataclass(frozen=True)
class DemoSizes:
    sft: int = 512
    preference: int = 512
    prompt: int = 256
    ptx: int = 128
    max_turns: int = 8
    sft_heldout: int = 64
    preference_heldout: int = 256
    prompt_heldout: int = 128
    context_turns: int = 1  # turns kept before a reply (prompts and pairs); the first kept is the user's
    max_reply_chars: int = 300  # longer replies are left out of pairs (they would be truncated)
    rejected: str = "garbled"  # garbled | off-topic | mixed
    per_conversation: int = 3  # prompts / pairs taken from one conversation (at different replies)


def chitchat_conversations() -> list[list[str]]:
    """All 7,168 chitchat conversations as lists of turn texts (speakers alternate), in the package's order.
    Empty messages are left out; a conversation may have a single turn (nobody answered)."""
    import chitchat_dataset

    convs = []
    data = chitchat_dataset.Dataset()
    for key in sorted(data):  # sorted: the package's dict order is not promised
        turns = []
        for group in data[key]["messages"]:
            text = "\n".join(m["text"].strip() for m in group if m["text"].strip())
            if text:
                turns.append(text)
        convs.append(turns)
    return convs


def _turns(texts: list[str]) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def _context(c: list[str], k: int, context_turns: int) -> list[str]:
    """The turns before turn k, at most `context_turns`, starting with a user turn (k - start is odd)."""
    start = max(0, k - context_turns)
    if (k - start) % 2 == 0:
        start += 1
    return c[start:k]


def sft_record(texts: list[str]) -> dict[str, Any]:
    return {"messages": _turns(texts)}


def garble(text: str, rng: random.Random) -> str | None:
    """The words of `text` in a shuffled order (None when it has fewer than 3 words or no other order)."""
    words = text.split()
    if len(words) < 3 or len(set(words)) < 2:
        return None
    for _ in range(10):
        shuffled = words[:]
        rng.shuffle(shuffled)
        if shuffled != words:
            return " ".join(shuffled)
    return None


def _similar_length(pool: list[str], lengths: list[int], n: int, rng: random.Random) -> str:
    lo = bisect.bisect_left(lengths, n / 1.5)
    hi = bisect.bisect_right(lengths, n * 1.5)
    if hi - lo < 8:  # too few of similar length: widen around the nearest ones
        mid = bisect.bisect_left(lengths, n)
        lo, hi = max(0, mid - 16), min(len(pool), mid + 16)
    return pool[rng.randrange(lo, hi)]


def _pair(c: list[str], k: int, pool: list[str], lengths: list[int], sizes: DemoSizes,
          rng: random.Random) -> dict[str, Any] | None:
    chosen = c[k]
    style = sizes.rejected if sizes.rejected != "mixed" else rng.choice(("garbled", "off-topic"))
    rejected = garble(chosen, rng) if style == "garbled" else _similar_length(pool, lengths, len(chosen), rng)
    if rejected is None or rejected == chosen:
        return None
    return {
        "context": _turns(_context(c, k, sizes.context_turns)),
        "chosen": [{"from": "assistant", "content": chosen}],
        "rejected": [{"from": "assistant", "content": rejected}],
        "rejected_style": style,
    }


def _reply_positions(c: list[str], sizes: DemoSizes, rng: random.Random) -> list[int]:
    """Up to `per_conversation` reply positions of a conversation, in random order."""
    ks = [k for k in range(1, min(len(c), sizes.max_turns), 2) if len(c[k]) <= sizes.max_reply_chars]
    rng.shuffle(ks)
    return ks[:sizes.per_conversation]


def _take(convs: list[list[str]], want: int, make) -> tuple[list[dict[str, Any]], int]:
    """Records from conversations in order until `want` are made; returns them and the conversations used."""
    out, used = [], 0
    for c in convs:
        if len(out) >= want:
            break
        used += 1
        out += make(c)
    return out[:want], used


def demo_records(sizes: DemoSizes = DemoSizes(), seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Raw records of each kind and held-out split, deterministic for a seed. Held-out splits take their
    conversations first, so they stay the same when the training sizes change."""
    if sizes.rejected not in REJECTED_STYLES:
        raise ValueError(f"rejected must be one of {REJECTED_STYLES}, got {sizes.rejected!r}")
    rng = random.Random(seed)
    convs = [c for c in chitchat_conversations() if len(c) >= 2]  # a reply is needed for every kind
    rng.shuffle(convs)
    mt = sizes.max_turns
    # Off-topic replies come from conversations no pair or prompt is built from: the last ones of the shuffled
    # list (kinds take theirs from the front). Sorted by (length, text): equal lengths keep one order anywhere.
    donors = convs[-max(256, len(convs) // 8):]
    convs = convs[: len(convs) - len(donors)]
    pool = sorted({t for c in donors for t in c[1::2]}, key=lambda t: (len(t), t))
    lengths = [len(t) for t in pool]

    def pairs(c: list[str]) -> list[dict[str, Any]]:
        made = (_pair(c, k, pool, lengths, sizes, rng) for k in _reply_positions(c, sizes, rng))
        return [p for p in made if p is not None]

    def prompts(c: list[str]) -> list[dict[str, Any]]:
        ks = [k for k in range(1, min(len(c), mt) + 1, 2)]  # reply positions: c[:k] ends with the user
        rng.shuffle(ks)
        return [{"messages": _turns(_context(c, k, sizes.context_turns))} for k in ks[:sizes.per_conversation]]

    plan = [
        ("sft_heldout", sizes.sft_heldout, lambda c: [sft_record(c[:mt])]),
        ("preference_heldout", sizes.preference_heldout, pairs),
        ("prompt_heldout", sizes.prompt_heldout, prompts),
        ("sft", sizes.sft, lambda c: [sft_record(c[:mt])]),
        ("preference", sizes.preference, pairs),
        ("prompt", sizes.prompt, prompts),
        ("ptx", sizes.ptx, lambda c: [{"source": "", "Target": "\n".join(c[:mt])}]),
    ]
    out: dict[str, list[dict[str, Any]]] = {}
    for name, want, make in plan:
        out[name], used = _take(convs, want, make)
        if len(out[name]) < want:
            raise ValueError(f"demo sizes: {name} needs {want} records, the conversations left give {len(out[name])}")
        convs = convs[used:]
    return out


def base_kind(name: str) -> str:
    """'preference_heldout' -> 'preference': the prepared kind of a split."""
    return name.removesuffix("_heldout")


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


def write_demo(out: str | Path, sizes: DemoSizes = DemoSizes(), seed: int = 0) -> dict[str, Path]:
    """Write OUT/<kind>.jsonl for each kind and held-out split; returns the paths."""
    recs = demo_records(sizes, seed)
    return {kind: write_jsonl(rows, Path(out) / f"{kind}.jsonl") for kind, rows in recs.items() if rows}
