"""Tokenisation with assistant-only labels, as pure functions over normalised records.

A conversation is rendered once with the chat template and cut into segments: each assistant reply plus the
`end_of_assistant` marker that follows it is a labelled segment, everything else (system, user turns, role
headers, the context of a preference pair) is masked with IGNORE_INDEX. Segments are tokenised separately and
concatenated (as the seed does), so label boundaries fall exactly on token boundaries and decoding the labelled
tokens gives back exactly the replies and their end markers.

Replies are located by rendering the conversation once with placeholders for the messages (exact, and linear in
the number of turns); templates that look at message content fall back to rendering each prefix with the
generation prompt (see conversation_segments).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from relay.data.formats import PreferenceRecord, PromptRecord, PtxRecord, Record, SftRecord, Turn
from relay.data.templates import ChatFormatter

IGNORE_INDEX = -100
Segments = list[tuple[str, bool]]  # (text, is_label)

# Outcome statuses; each is counted in the summary that `relay prepare` prints.
OK, TRUNCATED, TRUNCATED_MID, TOO_LONG, PROMPT_TRIMMED, NO_LABELS, ERROR = (
    "ok", "truncated_whole_turns", "truncated_mid_reply", "dropped_too_long", "prompt_turns_trimmed",
    "dropped_no_labels", "error",
)


class TokenizeError(ValueError):
    """A record the template cannot mark up (e.g. it rewrites the reply text)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    def label_spans(self) -> list[tuple[int, int]]:
        """[start, end) token ranges of consecutive labelled tokens."""
        spans, start = [], None
        for i, lab in enumerate(self.labels):
            if lab != IGNORE_INDEX and start is None:
                start = i
            elif lab == IGNORE_INDEX and start is not None:
                spans.append((start, i))
                start = None
        if start is not None:
            spans.append((start, len(self.labels)))
        return spans


@dataclass
class Outcome:
    """What became of one record: a row for the output (or None when dropped) and a status."""

    row: dict[str, Any] | None
    status: str
    error: str | None = None


# ------------------------------------------------------------------------------------------------ segments


def conversation_segments(fmt: ChatFormatter, turns: list[Turn], label_from: int = 0) -> Segments:
    """Cut the rendered conversation into masked/labelled text; assistant turns at index >= label_from are labels.

    Fast path: render once with a unique placeholder for each message, so every reply and the template text
    around it are located exactly (a reply that also occurs in a user turn or a header cannot be mistaken for
    it); the result is accepted only if substituting the real messages back gives exactly the real rendering.
    Templates that look at the content (trim it, branch on it) take the slower prefix-rendering path."""
    msgs = fmt.messages(turns)
    offset = len(msgs) - len(turns)  # a system message added by the config
    labelled = {i + offset for i, t in enumerate(turns) if t.role == "assistant" and i >= label_from}
    full = fmt.render(turns)
    segs = _placeholder_segments(fmt, msgs, labelled)
    if segs is not None and "".join(text for text, _ in segs) == full:
        return segs
    return _prefix_segments(fmt, turns, label_from, full)


def _placeholder(i: int) -> str:
    return f"RELAYMSG{i}PLACEHOLDER"


def _placeholder_segments(fmt: ChatFormatter, msgs: list[dict[str, str]], labelled: set[int]) -> Segments | None:
    eoa = fmt.cfg.end_of_assistant
    marked = [{"role": m["role"], "content": _placeholder(i)} for i, m in enumerate(msgs)]
    try:
        skel = fmt.render_messages(marked)
    except Exception:  # noqa: BLE001 - a template that rejects placeholders: use the slow path
        return None
    starts = []
    pos = 0
    for i in range(len(msgs)):
        p = skel.find(_placeholder(i), pos)
        if p < 0:
            return None
        starts.append(p)
        pos = p + len(_placeholder(i))
    segs: Segments = []
    text, pos = "", 0
    for i, m in enumerate(msgs):
        p = starts[i]
        text += skel[pos:p]
        after = p + len(_placeholder(i))
        if i in labelled:
            nxt = starts[i + 1] if i + 1 < len(msgs) else len(skel)
            e = skel.find(eoa, after, nxt)
            if e < 0:
                return None  # let the slow path decide (and name the problem)
            segs.append((text, False))
            segs.append((m["content"] + skel[after : e + len(eoa)], True))
            text, pos = "", e + len(eoa)
        else:
            text += m["content"]
            pos = after
    segs.append((text + skel[pos:], False))
    return segs


def _prefix_segments(fmt: ChatFormatter, turns: list[Turn], label_from: int, full: str) -> Segments:
    """Reply i starts where the rendering of turns[:i] with the generation prompt ends (searching for the reply
    text when the template's prefixes are not stable); O(turns^2) renders."""
    eoa = fmt.cfg.end_of_assistant
    segs: Segments = []
    cursor = 0
    for i, turn in enumerate(turns):
        if turn.role != "assistant" or i < label_from:
            continue
        prefix = fmt.render(turns[:i], add_generation_prompt=True)
        start = len(prefix) if full.startswith(prefix) and len(prefix) >= cursor else cursor
        content = turn.content
        cstart = full.find(content, start)
        if cstart < 0:  # templates that trim replies
            content = content.strip()
            cstart = full.find(content, start)
        if cstart < 0:
            raise TokenizeError(f"the chat template changes the text of assistant turn {i}: cannot find it")
        epos = full.find(eoa, cstart + len(content))
        if epos < 0:
            raise TokenizeError(f"end_of_assistant {eoa!r} not found after assistant turn {i}")
        end = epos + len(eoa)
        segs.append((full[cursor:cstart], False))
        segs.append((full[cstart:end], True))
        cursor = end
    segs.append((full[cursor:], False))
    return segs


def ptx_segments(rec: PtxRecord, eos_token: str | None) -> Segments:
    """Plain text (no chat template): `source` masked, `Target` plus eos labelled, as in the seed's ptx data."""
    return [(rec.source, False), (rec.target + (eos_token or ""), True)]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added. Fast tokenizers go straight to their Rust backend:
    the same ids as `tokenizer(texts)`, without the per-item conversion that took a third of the time."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def decode_many(tokenizer, seqs: list[list[int]]) -> list[str]:
    """Decoded text of each id list, special tokens kept, no clean-up (so the text is exactly what was encoded)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(seqs, skip_special_tokens=False)
    return [decode(tokenizer, s) for s in seqs]


def encode_segments(tokenizer, batch: list[Segments]) -> list[Encoded]:
    """Tokenise every segment of every item in one batched call, then concatenate per item."""
    ids = encode_texts(tokenizer, [text for segs in batch for text, _ in segs])
    out, k = [], 0
    for segs in batch:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, is_label in segs:
            piece = ids[k]
            k += 1
            input_ids.extend(piece)
            labels.extend(piece if is_label else [IGNORE_INDEX] * len(piece))
        out.append(Encoded(input_ids, labels))
    return out


def fit_labeled(enc: Encoded, max_length: int | None) -> tuple[Encoded | None, str]:
    """Drop masked tokens after the last reply (nothing to learn there, as in the seed), then cut to max_length:
    at the end of the last whole reply that fits, else mid-reply; drop the sample if no labelled token is left."""
    spans = enc.label_spans()
    if not spans:
        return None, NO_LABELS
    end = spans[-1][1]
    enc = Encoded(enc.input_ids[:end], enc.labels[:end])
    if max_length is None or end <= max_length:
        return enc, OK
    whole = [e for _, e in spans if e <= max_length]
    if whole:
        cut = max(whole)
        return Encoded(enc.input_ids[:cut], enc.labels[:cut]), TRUNCATED
    if spans[0][0] < max_length:
        return Encoded(enc.input_ids[:max_length], enc.labels[:max_length]), TRUNCATED_MID
    return None, TOO_LONG


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def label_texts(tokenizer, enc: Encoded) -> list[str]:
    """The decoded text of each labelled span: the assistant replies with their end markers."""
    return decode_many(tokenizer, [enc.input_ids[s:e] for s, e in enc.label_spans()])


# ------------------------------------------------------------------------------------------------ rows


def _meta(rec: Record) -> str:
    return json.dumps(rec.meta, ensure_ascii=False, default=str) if rec.meta else ""


def _labeled_row(tokenizer, enc: Encoded, prefix: str = "") -> dict[str, Any]:
    spans = enc.label_spans()
    texts = decode_many(tokenizer, [enc.input_ids] + [enc.input_ids[s:e] for s, e in spans])
    return {
        f"{prefix}input_ids": enc.input_ids,
        f"{prefix}labels": enc.labels,
        f"{prefix}attention_mask": [1] * len(enc.input_ids),
        f"{prefix}text": texts[0],
        f"{prefix}label_text": texts[1:],
    }


def _worse(a: str, b: str) -> str:
    order = (OK, TRUNCATED, TRUNCATED_MID)
    return a if order.index(a) >= order.index(b) else b


def prepare_batch(kind: str, records: list[Record], tokenizer, fmt: ChatFormatter | None, max_length: int | None) -> list[Outcome]:
    """Tokenise a batch of normalised records of one kind into output rows (see shards.SCHEMAS)."""
    if kind == "prompt":
        return [_prompt_outcome(r, tokenizer, fmt, max_length) for r in records]  # type: ignore[arg-type]
    per_record: list[list[Segments] | str] = []
    for rec in records:
        try:
            if isinstance(rec, SftRecord):
                per_record.append([conversation_segments(fmt, rec.messages)])
            elif isinstance(rec, PreferenceRecord):
                n = len(rec.context)
                per_record.append([conversation_segments(fmt, rec.context + rec.chosen, label_from=n),
                                   conversation_segments(fmt, rec.context + rec.rejected, label_from=n)])
            elif isinstance(rec, PtxRecord):
                per_record.append([ptx_segments(rec, tokenizer.eos_token)])
            else:
                raise TypeError(f"prepare_batch({kind!r}): got a {type(rec).__name__}")
        except TokenizeError as e:
            per_record.append(str(e))
    encoded = iter(encode_segments(tokenizer, [s for item in per_record if not isinstance(item, str) for s in item]))
    out = []
    for rec, item in zip(records, per_record):
        if isinstance(item, str):
            out.append(Outcome(None, ERROR, item))
            continue
        fitted = [fit_labeled(next(encoded), max_length) for _ in item]
        bad = [st for enc, st in fitted if enc is None]
        if bad:
            out.append(Outcome(None, bad[0]))
            continue
        meta = _meta(rec)
        if kind == "preference":
            (c, cst), (r, rst) = fitted
            row = {**_labeled_row(tokenizer, c, "chosen_"), **_labeled_row(tokenizer, r, "rejected_"), "meta": meta}
            out.append(Outcome(row, _worse(cst, rst)))
        else:
            enc, st = fitted[0]
            out.append(Outcome({**_labeled_row(tokenizer, enc), "meta": meta}, st))
    return out


def _prompt_outcome(rec: PromptRecord, tokenizer, fmt: ChatFormatter, max_length: int | None) -> Outcome:
    """Prompt ids end with the generation prompt, unpadded: batches are left-padded (see pad_left) to generate.
    A prompt over max_length loses its oldest rounds (a system turn stays); if one question alone is too long,
    the record is dropped."""
    msgs, status = list(rec.messages), OK
    system = msgs[:1] if msgs[0].role == "system" else []
    while True:
        text = fmt.render(msgs, add_generation_prompt=True)
        ids = encode_texts(tokenizer, [text])[0]
        if max_length is None or len(ids) <= max_length:
            break
        body = msgs[len(system):]
        if len(body) <= 1:
            return Outcome(None, TOO_LONG)
        msgs, status = system + body[2:], PROMPT_TRIMMED
    row = {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "text": text,
        "messages": json.dumps([{"role": t.role, "content": t.content} for t in msgs], ensure_ascii=False),
        "meta": _meta(rec),
    }
    return Outcome(row, status)


def pad_left(seqs: list[list[int]], pad_id: int, length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad prompts for generation; returns (ids, attention_mask)."""
    n = max(map(len, seqs)) if length is None else length
    ids = [[pad_id] * (n - len(s)) + s for s in seqs]
    mask = [[0] * (n - len(s)) + [1] * len(s) for s in seqs]
    return ids, mask


def pad_right(
    seqs: list[list[int]], pad_id: int, length: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad training sequences (use IGNORE_INDEX as pad_id for labels); returns (ids, attention_mask)."""
    n = max(map(len, seqs)) if length is None else length
    ids = [s + [pad_id] * (n - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (n - len(s)) for s in seqs]
    return ids, mask
